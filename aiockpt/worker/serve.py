"""The worker's serving loop: handshake, dispatch, writes in arrival order."""

from __future__ import annotations

import asyncio
import gc
import logging
import mmap
import os
import socket
import sys
import time
import traceback
from typing import Any

import msgspec

from aiockpt.channel import Channel
from aiockpt.errors import ProtocolError
from aiockpt.protocol import (
    PROTOCOL_VERSION,
    ArenaRef,
    InitPayload,
    ReadyPayload,
    RequestType,
    StateDictPayload,
    TensorInArena,
    TensorInline,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
    WriteResultPayload,
)
from aiockpt.refs import resolve_ref
from aiockpt.tensors import tensor_from_leaf, value_from_leaf
from aiockpt.tree import unflatten

__all__ = ["serve"]

logger = logging.getLogger("aiockpt.worker")

#: the handshake is the first exchange; its request id is fixed so a failure can answer it
#: even when the request itself did not decode
HANDSHAKE_ID = 0


def failure(request_id: int, request_type: RequestType, exc: BaseException) -> WorkerResponse:
    """The response that reports ``exc``, its type, message and full traceback."""
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return WorkerResponse(
        request_id,
        request_type,
        success=False,
        error_type=name,
        error_msg=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


class ArenaMaps:
    """The worker's mappings of the parent's shared-memory arenas, by path.

    The worker unlinks an arena's file as soon as it has mapped it: from then on only the two
    mappings keep the memory alive, so a crash of either process leaks nothing in /dev/shm.
    """

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, ref: ArenaRef) -> memoryview:
        mapping = self._maps.get(ref.path)
        if mapping is None:
            fd = os.open(ref.path, os.O_RDWR)
            try:
                mapping = mmap.mmap(fd, ref.size)
            finally:
                os.close(fd)
            try:
                os.unlink(ref.path)
            except FileNotFoundError:
                pass  # the parent unlinked it first: both sides had it mapped already
            self._maps[ref.path] = mapping
        return memoryview(mapping)

    def release(self, path: str) -> None:
        mapping = self._maps.pop(path, None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # a writer kept a tensor view; the mapping goes with the last reference


def materialize(payload: StateDictPayload, arenas: ArenaMaps) -> Any:
    """The state dict a request describes; arena tensors are views of the mapping."""
    arena = arenas.view(payload.arena) if payload.arena is not None else None
    leaves = [
        tensor_from_leaf(leaf, arena)
        if isinstance(leaf, (TensorInArena, TensorInline))
        else value_from_leaf(leaf)
        for leaf in payload.leaves
    ]
    return unflatten(payload.skeleton, leaves)


class Worker:
    def __init__(self, channel: Channel, init: InitPayload) -> None:
        self._channel = channel
        self._init = init
        self._arenas = ArenaMaps()
        self._writes_done = 0
        self._writing = False
        self.writer: Any = None

    def initialize(self) -> None:
        """Run the init functions and build the writer, as torch's CheckpointProcess does."""
        init = self._init
        # Resolve import references exactly as they resolved in the parent.
        sys.path[:] = [*init.sys_path, *(p for p in sys.path if p not in init.sys_path)]
        if init.gc.disable_automatic:
            gc.disable()
        if init.subprocess_init_fn is not None:
            resolve_ref(init.subprocess_init_fn)(*init.subprocess_init_args)
        writer_args = dict(init.checkpoint_writer_init_args)
        writer_args.setdefault("rank_info", init.rank_info)
        self.writer = resolve_ref(init.checkpoint_writer_init_fn)(**writer_args)

    async def run(self, frames: Any) -> int:
        """Serve until TERMINATE (exit code 0) or EOF (the parent died)."""
        queue: asyncio.Queue[WorkerRequest] = asyncio.Queue()
        async with asyncio.TaskGroup() as tasks:
            ordered = tasks.create_task(self._handle_in_order(queue))
            reading = tasks.create_task(self._dispatch(frames, queue))
            done, _ = await asyncio.wait({ordered, reading}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done and not ordered.done():
                if self._writing:
                    # A write thread cannot be interrupted, and nobody is left to answer: exit
                    # now. The half-written temporary directory is removed by the next start.
                    logger.warning("parent closed the channel during a write; exiting")
                    sys.stderr.flush()
                    os._exit(0)
                ordered.cancel()
            reading.cancel()
        return 0

    async def _dispatch(self, frames: Any, queue: asyncio.Queue[WorkerRequest]) -> None:
        codec = self._channel.codec
        async for body in frames:
            request = codec.decode_request(body)
            if request.request_type is RequestType.PING:
                await self._channel.send(WorkerResponse(request.request_id, RequestType.PING, True))
            else:
                queue.put_nowait(request)

    async def _handle_in_order(self, queue: asyncio.Queue[WorkerRequest]) -> None:
        while True:
            request = await queue.get()
            if request.request_type is RequestType.TERMINATE_PROCESS:
                await self._channel.send(
                    WorkerResponse(request.request_id, request.request_type, True)
                )
                return
            if request.request_type is RequestType.WRITE_CHECKPOINT and isinstance(
                request.payload, WritePayload
            ):
                response = await self._write(request.request_id, request.payload)
            else:
                response = failure(
                    request.request_id,
                    request.request_type,
                    ProtocolError(f"unexpected {request.request_type.value} request"),
                )
            await self._channel.send(response)

    async def _write(self, request_id: int, payload: WritePayload) -> WorkerResponse:
        self._writing = True
        try:
            started = time.perf_counter()
            result = await asyncio.to_thread(self._write_blocking, payload)
            seconds = time.perf_counter() - started
        except Exception as exc:
            logger.warning("write to %s failed: %s: %s", payload.path, type(exc).__name__, exc)
            return failure(request_id, RequestType.WRITE_CHECKPOINT, exc)
        finally:
            self._writing = False
            self._after_write()
        try:
            msgspec.msgpack.encode(result)
        except (TypeError, msgspec.EncodeError):
            result = None  # torch-style writers may return futures or other local objects
        return WorkerResponse(
            request_id,
            RequestType.WRITE_CHECKPOINT,
            True,
            payload=WriteResultPayload(write_seconds=seconds, result=result),
        )

    def _write_blocking(self, payload: WritePayload) -> Any:
        state_dict = materialize(payload.state_dict, self._arenas)
        return self.writer.write(state_dict=state_dict, path=payload.path, **payload.kwargs)

    def _after_write(self) -> None:
        self._writes_done += 1
        gc_options = self._init.gc
        if gc_options.collect_after_write:
            gc.collect()
        if gc_options.freeze_after_first_write and self._writes_done == 1:
            gc.freeze()


async def serve(fd: int, *, max_frame_size: int) -> int:
    """Serve the parent on the inherited socket ``fd``; return the process exit code."""
    channel = await Channel.open(socket.socket(fileno=fd), max_frame_size=max_frame_size)
    frames = channel.frames()
    try:
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return 0  # the parent went away before the handshake
        try:
            channel.codec.check_handshake_request(first)
            request = channel.codec.decode_request(first)
            if not isinstance(request.payload, InitPayload):
                raise ProtocolError(f"expected an init request, got {request.request_type.value}")
        except ProtocolError as exc:
            await channel.send(failure(HANDSHAKE_ID, RequestType.INIT, exc))
            return 2
        worker = Worker(channel, request.payload)
        try:
            worker.initialize()
        except BaseException as exc:
            await channel.send(failure(request.request_id, RequestType.INIT, exc))
            return 1
        ready = ReadyPayload(protocol_version=PROTOCOL_VERSION, pid=os.getpid())
        await channel.send(
            WorkerResponse(request.request_id, RequestType.INIT, True, payload=ready)
        )
        return await worker.run(frames)
    except (ConnectionError, ProtocolError, ExceptionGroup) as exc:
        broken = exc.exceptions[0] if isinstance(exc, ExceptionGroup) else exc
        if not isinstance(broken, (ConnectionError, ProtocolError)):
            raise
        # A broken channel cannot carry an error report; the parent sees our exit instead.
        logger.error("channel to the parent broke: %s", broken)
        return 2
    finally:
        await channel.aclose()
