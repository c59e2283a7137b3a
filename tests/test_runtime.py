"""The one implementation of each small job: finish under cancel, loop choice, libc."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os

import pytest
import uvloop

from aiockpt._runtime import (
    collection_paused,
    finish_even_if_cancelled,
    libc_function,
    new_event_loop,
    run_on_fastest_loop,
)


async def test_work_finishes_although_the_caller_is_cancelled_then_the_cancel_is_raised() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def clean_up() -> str:
        started.set()
        await release.wait()
        finished.append("done")
        return "done"

    caller = asyncio.create_task(finish_even_if_cancelled(clean_up()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0)  # let the cancellation reach the caller, which keeps waiting
    caller.cancel()  # twice: still finishes
    await asyncio.sleep(0)
    assert not caller.done() and finished == []
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["done"]


async def test_without_a_cancel_the_result_or_the_error_comes_back() -> None:
    async def answer() -> int:
        return 42

    async def broken() -> None:
        raise OSError("disk on fire")

    assert await finish_even_if_cancelled(answer()) == 42
    with pytest.raises(OSError, match="disk on fire"):
        await finish_even_if_cancelled(broken())


async def test_a_failure_after_the_cancel_is_logged_and_the_cancel_wins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def failing_clean_up() -> None:
        started.set()
        await release.wait()
        raise OSError("could not clean up")

    caller = asyncio.create_task(finish_even_if_cancelled(failing_clean_up()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0)
    release.set()
    with caplog.at_level(logging.ERROR, "aiockpt"), pytest.raises(asyncio.CancelledError):
        await caller
    assert "clean-up failed while cancelled" in caplog.text
    assert "could not clean up" in caplog.text


async def test_one_task_awaited_by_several_callers_runs_once() -> None:
    release = asyncio.Event()
    runs: list[int] = []

    async def close() -> int:
        runs.append(1)
        await release.wait()
        return len(runs)

    shared = asyncio.create_task(close())
    callers = [asyncio.create_task(finish_even_if_cancelled(shared)) for _ in range(3)]
    await asyncio.sleep(0)
    callers[0].cancel()
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [1, 1] and runs == [1]


def test_the_fastest_loop_is_uvloop_where_installed() -> None:
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run_on_fastest_loop(loop_type()) is uvloop.Loop
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_libc_functions_are_typed_per_caller_and_missing_ones_are_none() -> None:
    getpid = libc_function("getpid", ())
    assert getpid is not None and getpid() == os.getpid()
    as_pointer = libc_function("getpid", (), ctypes.c_void_p)
    assert as_pointer is not None and as_pointer.restype is ctypes.c_void_p
    assert getpid.restype is ctypes.c_int  # another caller's types do not leak into ours
    assert libc_function("aiockpt_no_such_function", ()) is None


def test_collection_paused_restores_what_it_found_even_after_an_error() -> None:
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), collection_paused():
        assert not gc.isenabled()
        1 / 0  # noqa: B018
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled(), "a caller's own pause must outlive ours"
    finally:
        gc.enable()
