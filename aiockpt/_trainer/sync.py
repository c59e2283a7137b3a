"""``SyncCheckpointer``: the same saves for plain synchronous training loops.

An event loop (uvloop where available) runs in one background thread and owns an ordinary
``Checkpointer``; each call hops onto it. The trainer's thread never waits for a write: it
waits for staging only when it asks to (``handle.staged.result()``), before changing its
tensors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from aiockpt._format.listing import ListedCheckpoint
from aiockpt._format.stateful import CallerState, StatefulLoad
from aiockpt._runtime import new_event_loop
from aiockpt._trainer.checkpointer import Checkpointer
from aiockpt._trainer.handles import SaveHandle, SaveProgress, SaveResult

__all__ = ["SyncCheckpointer", "SyncSaveHandle"]

T = TypeVar("T")


class SyncSaveHandle:
    """A save in progress, seen from synchronous code.

    ``staged`` and the handle itself are ``concurrent.futures.Future``-like: ``staged.result()``
    blocks until the tensors have been copied out, ``result()`` until the checkpoint is durable,
    and both raise what the save raised (see ``aiockpt.SaveHandle``).
    """

    def __init__(self, handle: SaveHandle, runner: _LoopThread) -> None:
        self.path = handle.path
        self.step = handle.step
        self._handle = handle
        self._runner = runner
        self.staged: concurrent.futures.Future[None] = runner.submit(_staged(handle))
        self._done: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()
        # Settled by a callback of the save's own task, which runs before anything that
        # awaited the task resumes: once wait() returns, done() is true.
        runner.loop.call_soon_threadsafe(handle.add_done_callback, self._settle)

    def _settle(self, handle: SaveHandle) -> None:
        try:
            self._done.set_result(handle.result())
        except asyncio.CancelledError:
            self._done.cancel()
        except BaseException as exc:
            self._done.set_exception(exc)

    def result(self, timeout: float | None = None) -> SaveResult:
        """Block until the checkpoint is durable; raise ``TimeoutError`` after ``timeout``."""
        return self._done.result(timeout)

    def done(self) -> bool:
        """True once the save committed, failed or was cancelled (``result()`` then returns
        or raises at once)."""
        return self._done.done()

    def add_done_callback(self, callback: Callable[[SyncSaveHandle], object]) -> None:
        """Call ``callback(handle)`` once the save is done, in the checkpointer's thread."""
        self._done.add_done_callback(lambda _: callback(self))

    def cancel(self) -> bool:
        """Cancel the save unless it has finished (see ``aiockpt.SaveHandle.cancel``)."""
        return self._runner.call(_cancel(self._handle))

    def progress(self) -> Iterator[SaveProgress]:
        """Follow the save from synchronous code: ``for p in handle.progress(): ...`` yields
        what ``aiockpt.SaveHandle.progress`` does (the current ``SaveProgress``, then each
        change, the last one "committed" or "failed"), each step blocking until the next
        change. Never raises for the save's failure: ``result()`` does."""
        follower = self._handle.progress()
        try:
            while True:
                try:
                    yield self._runner.call(_next_progress(follower))
                except StopAsyncIteration:
                    return
        finally:
            self._runner.call(_close_follower(follower))

    @property
    def current_progress(self) -> SaveProgress:
        """The latest ``SaveProgress`` (for logging without following)."""
        return self._handle.current_progress


async def _next_progress(follower: AsyncGenerator[SaveProgress, None]) -> SaveProgress:
    return await anext(follower)


async def _close_follower(follower: AsyncGenerator[SaveProgress, None]) -> None:
    await follower.aclose()


async def _staged(handle: SaveHandle) -> None:
    await handle.staged


async def _cancel(handle: SaveHandle) -> bool:
    return handle.cancel()


class _LoopThread:
    """One event loop running in a daemon thread until ``stop``."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name="aiockpt-sync-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncCheckpointer:
    """A ``Checkpointer`` for synchronous code; same arguments, same semantics.

    Use it as a context manager, or call ``close()``; a SyncCheckpointer that is never closed
    still leaves no worker behind when the interpreter exits.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self._runner = _LoopThread()
        self._checkpointer = Checkpointer(root, **options)
        self._closed = False

    def __enter__(self) -> SyncCheckpointer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def root(self) -> str | None:
        return self._checkpointer.root

    @property
    def worker_pid(self) -> int | None:
        return self._checkpointer.worker_pid

    def start(self, *, like: Any = None) -> None:
        """Start the worker now (and, given ``like``, its staging arena); see
        ``Checkpointer.start``."""
        like = None if like is None else CallerState(like)
        self._runner.call(self._checkpointer.start(like=like))

    def save(
        self,
        state_dict: Any,
        *,
        step: int,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> SyncSaveHandle:
        """Start saving as ``<root>/step_<step>``; see ``Checkpointer.save``. ``Stateful``
        values' ``state_dict()`` is called in this thread (it may run collectives)."""
        state = CallerState(state_dict)

        async def begin() -> SaveHandle:
            return self._checkpointer.save(state, step=step, metadata=metadata, overwrite=overwrite)

        return SyncSaveHandle(self._runner.call(begin()), self._runner)

    def save_to(
        self, state_dict: Any, path: str | os.PathLike[str], **options: Any
    ) -> SyncSaveHandle:
        """Start saving to ``path``; see ``Checkpointer.save_to``. ``Stateful`` values'
        ``state_dict()`` is called in this thread (it may run collectives)."""
        state = CallerState(state_dict)

        async def begin() -> SaveHandle:
            return self._checkpointer.save_to(state, path, **options)

        return SyncSaveHandle(self._runner.call(begin()), self._runner)

    def latest(self) -> str | None:
        return self._runner.call(self._checkpointer.latest())

    def checkpoints(self) -> list[ListedCheckpoint]:
        """The checkpoints under the root; see ``Checkpointer.checkpoints``."""
        return self._runner.call(self._checkpointer.checkpoints())

    def load_latest(self, state_dict: Any = None, **options: Any) -> Any:
        """Load the newest checkpoint, or return None; see ``Checkpointer.load_latest``.
        ``Stateful`` values' ``state_dict()`` and ``load_state_dict()`` are called in this
        thread (they may run collectives)."""
        stateful = StatefulLoad(state_dict)
        loaded = self._runner.call(self._checkpointer.load_latest(stateful.into, **options))
        return None if loaded is None else stateful.finish(loaded)

    def wait(self) -> list[SaveResult]:
        return self._runner.call(self._checkpointer.wait())

    def close(self) -> None:
        """Let saves in flight finish, stop the worker and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._runner.call(self._checkpointer.close())
        finally:
            self._runner.stop()
