"""Small jobs every process of aiockpt does the same way: one implementation each.

- ``finish_even_if_cancelled``: bounded clean-up (a close, a copy into shared memory) that a
  cancellation must not abandon halfway;
- ``new_event_loop`` and ``run_on_fastest_loop``: uvloop where installed, asyncio's loop
  otherwise;
- ``libc_function``: a function of the C library through ctypes, None where it lacks it;
- ``collection_paused``: the garbage collector off while many short-lived objects are made.

Standard library only (uvloop is imported when a loop is made): the elastic agent's workers
import this package and should not pay for torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

__all__ = [
    "collection_paused",
    "finish_even_if_cancelled",
    "libc_function",
    "new_event_loop",
    "run_on_fastest_loop",
]

logger = logging.getLogger("aiockpt")

_T = TypeVar("_T")


async def finish_even_if_cancelled(work: Awaitable[_T]) -> _T:
    """Await ``work`` to its end even if the calling task is cancelled meanwhile, then raise
    that cancellation; otherwise return its result or raise its exception.

    A coroutine is run as a task of its own; a task or future may be awaited by several
    callers at once (``close`` called concurrently). A failure of ``work`` that ends after a
    cancellation is logged, and the cancellation raised: the caller asked to stop. Only for
    bounded clean-up that must not be abandoned halfway.
    """
    future = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            # Unlike awaiting a shield, waiting never raises the work's own exception here.
            await asyncio.wait((future,))
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is None:
        return future.result()
    if not future.cancelled() and future.exception() is not None:
        logger.error("clean-up failed while cancelled", exc_info=future.exception())
    raise cancelled


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new uvloop loop where uvloop is installed, else asyncio's default loop.

    Besides speed, uvloop learns of child exits from SIGCHLD; the stock loop on Python < 3.12
    starts a waitpid thread per child.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is installed wherever the platform has it
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_on_fastest_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on ``new_event_loop()``'s loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


_libc: ctypes.CDLL | None = None


def libc_function(name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int) -> Any:
    """The C library's ``name``, typed, with errno kept for ``ctypes.get_errno()``; None
    where the platform's C library lacks it (not Linux, an old libc).

    Each call returns a function object of its own, so that two callers' ``argtypes`` never
    meet (``CDLL`` attributes are shared).
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        function = _libc[name]
    except (AttributeError, OSError):
        return None
    function.argtypes = tuple(argtypes)
    function.restype = restype
    return function


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """The garbage collector off for the duration, then as it was before.

    For work that makes tens of thousands of short-lived, acyclic objects (a save's or a
    load's per-tensor views and leaves): they would set off the collector's full passes over
    the whole heap, most of such a step's time with torch loaded, and there is nothing cyclic
    to collect. A concurrent pause in another thread is harmless: each restores only what it
    found.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
