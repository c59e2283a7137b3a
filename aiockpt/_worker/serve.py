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
from collections.abc import Callable
from typing import Any

import msgspec
import torch

from aiockpt._format import commit
from aiockpt._format.tree import DictNode, unflatten
from aiockpt._runtime import collection_paused
from aiockpt._trainer.staging import map_populated
from aiockpt._wire.channel import Channel
from aiockpt._wire.protocol import (
    CANCELLED_ERROR_TYPE,
    PROTOCOL_VERSION,
    ArenaPayload,
    ArenaRef,
    CancelPayload,
    CommitOptions,
    InitPayload,
    Leaf,
    ReadyPayload,
    RequestType,
    ShardSpec,
    StagedPayload,
    StateDictPayload,
    TensorInArena,
    TensorInline,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
    WriteResultPayload,
)
from aiockpt._wire.refs import resolve_ref
from aiockpt._wire.session import HANDSHAKE_ID, Route, WorkerSession, WriteCancelled, WriteGate
from aiockpt._wire.tensors import dtype_from_name, tensor_from_leaf, value_from_leaf
from aiockpt._worker.progress import ProgressReports
from aiockpt._worker.rank_group import RankGroup
from aiockpt.errors import CoordinationError, ProtocolError, RankFailed, qualified_name
from aiockpt.writers import create_writer
from aiockpt.writers.base import StagedLayout, StagedStateDict, observe_bytes_written

__all__ = ["serve"]

#: the longest a write sent while staging waits for the trainer's next staged bytes
_STAGING_STALL_S = 600.0

logger = logging.getLogger("aiockpt._worker")


def failure(request_id: int, request_type: RequestType, exc: BaseException) -> WorkerResponse:
    """The response that reports ``exc``, its type, message and full traceback; for a
    multi-rank save that failed elsewhere, the failing rank and that rank's traceback."""
    if isinstance(exc, WriteCancelled):
        return WorkerResponse(request_id, request_type, False, CANCELLED_ERROR_TYPE, str(exc))
    if isinstance(exc, RankFailed):  # pass on what the failing rank reported, not our raise
        return WorkerResponse(
            request_id,
            request_type,
            success=False,
            error_type=exc.error_type,
            error_msg=exc.args[0],
            traceback=exc.traceback,
            failed_rank=exc.rank,
        )
    return WorkerResponse(
        request_id,
        request_type,
        success=False,
        error_type=qualified_name(type(exc)),
        error_msg=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        failed_rank=exc.rank if isinstance(exc, CoordinationError) else None,
    )


class ArenaMaps:
    """The worker's mappings of the parent's shared-memory arenas, by ``ArenaRef.path``.

    An arena is the parent's memfd, opened as ``/proc/<parent pid>/fd/<fd>``: nothing to
    unlink, and its memory goes with the last of the parent's descriptor and the mappings.
    A path names whatever the parent has open under that descriptor number now, so a mapping
    is keyed by the file it maps too: a descriptor number reused for a newer arena gets a
    mapping of its own.
    """

    def __init__(self, before_release: Callable[[mmap.mmap], None] | None = None) -> None:
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap]] = {}
        #: released while a view of them was still alive: closed as soon as they can be
        self._lingering: list[mmap.mmap] = []
        #: called with a mapping about to be released (to drop views kept of it)
        self._before_release = before_release

    def view(self, ref: ArenaRef) -> memoryview:
        """The arena's memory, mapping it first if needed (blocking: it faults pages in).

        Raises ``OSError`` when the file cannot be opened, ``ValueError`` when it is
        smaller than ``ref.size``.
        """
        fd = os.open(ref.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            identity = (info.st_dev, info.st_ino)
            known = self._maps.get(ref.path)
            if known is not None and known[0] == identity and len(known[1]) >= ref.size:
                return memoryview(known[1])
            if known is not None:
                self.release(ref.path)  # the parent's descriptor now names another arena
            if info.st_size < ref.size:
                raise ValueError(
                    f"arena {ref.path} holds {info.st_size} bytes, the request says {ref.size}"
                )
            mapping = map_populated(fd, ref.size)
        finally:
            os.close(fd)
        self._maps[ref.path] = (identity, mapping)
        return memoryview(mapping)

    def release(self, path: str) -> None:
        """Unmap the arena at ``path``. A mapping still viewed (a writer kept a tensor of a
        finished write) cannot be closed yet: that is logged, and ``close_lingering`` closes
        it once the view is gone."""
        known = self._maps.pop(path, None)
        if known is None:
            return
        if self._before_release is not None:
            self._before_release(known[1])
        try:
            known[1].close()
        except BufferError:
            logger.warning(
                "arena %s (%d bytes) was released while still viewed (a writer kept a tensor "
                "of a finished write); it stays mapped until that view is gone",
                path,
                len(known[1]),
            )
            self._lingering.append(known[1])

    def close_lingering(self) -> None:
        """Close the released mappings whose views have gone since."""
        still: list[mmap.mmap] = []
        for mapping in self._lingering:
            try:
                mapping.close()
            except BufferError:
                still.append(mapping)
        self._lingering = still


#: what a request's arena tensors are viewed in when it names no arena: only empty tensors
#: fit in it (a state dict whose tensors are all empty has no bytes to stage)
_NO_ARENA = memoryview(b"")


def shards_of(payload: StateDictPayload) -> dict[int, ShardSpec]:
    """Leaf index -> where that tensor lies in the whole, for the pieces of sharded tensors."""
    return {
        index: leaf.shard
        for index, leaf in enumerate(payload.leaves)
        if isinstance(leaf, TensorInArena) and leaf.shard is not None
    }


def materialize(
    payload: StateDictPayload, arenas: ArenaMaps, layouts: Layouts | None = None
) -> Any:
    """The state dict a request describes; arena tensors are views of the mapping. With
    ``layouts``, a dict at the top comes as a ``StagedStateDict`` whose layout is the last
    request's when the structure is the same."""
    arena = arenas.view(payload.arena) if payload.arena is not None else _NO_ARENA
    if layouts is not None and isinstance(payload.skeleton, DictNode):
        return layouts.state_dict(payload, arena)
    return unflatten(payload.skeleton, [_leaf_value(leaf, arena) for leaf in payload.leaves])


def _leaf_value(leaf: Leaf, arena: memoryview) -> Any:
    if isinstance(leaf, (TensorInArena, TensorInline)):
        return tensor_from_leaf(leaf, arena)
    return value_from_leaf(leaf)


class Layouts:
    """The structure of the last request, so that a repeated one costs one comparison (no
    key paths, no per-leaf checks), and writers can reuse their plans
    (``StagedLayout.version``).

    The state dict made for a layout on an arena's mapping is kept and handed out again to
    the next request of that layout on that mapping whose other leaves (plain values) are
    the same: its tensors view the same bytes, which the trainer has staged anew. Kept
    state dicts view the mapping, so ``forget`` drops them before it is released.
    """

    def __init__(self) -> None:
        self._layout: StagedLayout | None = None
        #: the tensor leaves as they were, the other leaves' kinds
        self._key: list[Any] = []
        #: (leaf index, dtype, shape unless flat, elements, offset) of the arena tensors
        self._views: list[tuple[int, torch.dtype, list[int] | None, int, int]] = []
        #: leaves made anew every time (plain values, empty or inline tensors)
        self._others: list[int] = []
        self._end = 0
        #: id(mapping) -> (mapping, the other leaves, the state dict made of them on it)
        self._made: dict[int, tuple[Any, list[Any], StagedStateDict]] = {}

    def state_dict(self, payload: StateDictPayload, arena: memoryview) -> StagedStateDict:
        """Raises ``ValueError`` when a tensor's description does not fit its bytes."""
        leaves = payload.leaves
        key = [leaf if type(leaf) is TensorInArena else type(leaf) for leaf in leaves]
        layout = self._layout
        if layout is None or key != self._key or payload.skeleton != layout.skeleton:
            # First time: every leaf checked as it is made.
            first = [_leaf_value(leaf, arena) for leaf in leaves]
            self._remember(payload, key)
            assert self._layout is not None
            return StagedStateDict(self._layout, first, arena)
        if self._end > len(arena):
            raise ValueError(f"tensor bytes up to {self._end} lie outside the arena")
        others = [leaves[index] for index in self._others]
        mapping = arena.obj
        made = self._made.get(id(mapping))
        if made is not None and made[0] is mapping and made[1] == others:
            made[2].wait_staged = None
            return made[2]
        values: list[Any] = [None] * len(leaves)
        for index in self._others:
            values[index] = _leaf_value(leaves[index], arena)
        for index, dtype, shape, numel, offset in self._views:
            # A storage of its own per tensor, as tensor_from_leaf makes it (a view of the
            # whole arena would be pickled whole by anything that torch.saves it).
            tensor = torch.frombuffer(arena, dtype=dtype, count=numel, offset=offset)
            values[index] = tensor if shape is None else tensor.view(shape)
        state_dict = StagedStateDict(layout, values, arena)
        if len(self._made) >= _STATE_DICTS_KEPT:
            self._made = {}
        self._made[id(mapping)] = (mapping, others, state_dict)
        return state_dict

    def forget(self, mapping: Any) -> None:
        """Drop what was kept of ``mapping`` (an arena's ``mmap``, about to be released)."""
        made = self._made.get(id(mapping))
        if made is not None and made[0] is mapping:
            self._made = {k: v for k, v in self._made.items() if v[0] is not mapping}

    def _remember(self, payload: StateDictPayload, key: list[Any]) -> None:
        self._layout, self._key = StagedLayout(payload.skeleton), key
        self._views, self._others, self._end, self._made = [], [], 0, {}
        for index, leaf in enumerate(payload.leaves):
            if type(leaf) is TensorInArena:
                self._layout.regions[index] = (leaf.offset, leaf.nbytes)
            if type(leaf) is not TensorInArena or not leaf.nbytes:
                self._others.append(index)
                continue
            dtype = dtype_from_name(leaf.dtype)
            numel = leaf.nbytes // dtype.itemsize
            shape = None if leaf.shape == [numel] else leaf.shape
            self._views.append((index, dtype, shape, numel, leaf.offset))
            self._end = max(self._end, leaf.offset + leaf.nbytes)


def _whole(payload: WritePayload) -> StateDictPayload:
    """A write's state dict as the session left it: expanded (``LastLayout.expand``)."""
    state = payload.state_dict
    assert isinstance(state, StateDictPayload), "the session expands repeated state dicts"
    return state


#: state dicts ``Layouts`` keeps, one per arena (saves in flight use one arena each)
_STATE_DICTS_KEPT = 4


class ServingWorker:
    def __init__(self, channel: Channel, session: WorkerSession, init: InitPayload) -> None:
        self._channel = channel
        self._init = init
        self._layouts = Layouts()
        self._arenas = ArenaMaps(before_release=self._layouts.forget)
        self._writes_done = 0
        self._writing = False
        self.writer: Any = None
        #: (format, writer options as JSON) -> writer
        self._format_writers: dict[tuple[str, bytes], Any] = {}
        self._session = session
        #: which writes a CANCEL may still stop (see aiockpt._wire.session)
        self._gate = WriteGate()
        self.group: RankGroup | None = None
        #: generation to re-form the workers' process group under, once a write is answered
        self._regroup: int | None = None

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
        if init.group is not None:
            self.group = RankGroup(init.group)
        # What is alive now (torch's modules, the writer) lives as long as the worker: take it
        # out of the collector's full passes. Without this, every 40,000 objects a request of
        # 20,000 tensors decodes into set off a pass over torch's ~300,000 (0.14 s each).
        gc.freeze()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()

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
        """Answer the requests that must not wait behind a write; queue the others (the
        session says which is which)."""
        async for body in frames:
            # A write request of N tensors decodes into ~2N acyclic objects: no pass is due.
            with collection_paused():
                route, request, refusal = self._session.receive(body)
            kind, payload = request.request_type, request.payload
            if route is Route.REFUSED:
                problem = ProtocolError(str(refusal))
                await self._answer(failure(request.request_id, kind, problem))
                continue
            if route is Route.QUEUED:
                if kind is RequestType.WRITE_CHECKPOINT and isinstance(payload, WritePayload):
                    self._gate.admit(request.request_id, payload.staged_bytes)
                queue.put_nowait(request)
                continue
            if kind is RequestType.CANCEL and isinstance(payload, CancelPayload):
                self._gate.cancel(payload.request_id)
            elif kind is RequestType.STAGED and isinstance(payload, StagedPayload):
                self._gate.staged(payload)
            elif kind is RequestType.MAP_ARENA and isinstance(payload, ArenaPayload):
                try:
                    await asyncio.to_thread(self._arenas.view, payload.arena)
                except (OSError, ValueError) as exc:  # ValueError: a size the file has not
                    await self._answer(failure(request.request_id, kind, exc))
                    continue
            elif kind is RequestType.RELEASE_ARENA and isinstance(payload, ArenaPayload):
                self._arenas.release(payload.arena.path)
            await self._answer(WorkerResponse(request.request_id, kind, True))

    async def _answer(self, response: WorkerResponse) -> None:
        await self._channel.send(self._session.respond(response))

    async def _handle_in_order(self, queue: asyncio.Queue[WorkerRequest]) -> None:
        while True:
            request = await queue.get()
            if request.request_type is RequestType.TERMINATE_PROCESS:
                await self._answer(WorkerResponse(request.request_id, request.request_type, True))
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
            await self._answer(response)
            if self._regroup is not None and self.group is not None:
                generation, self._regroup = self._regroup, None
                try:
                    await asyncio.to_thread(self.group.form_process_group, generation)
                except Exception as exc:  # the next save notices and tries again
                    logger.error("could not re-form the workers' process group: %s", exc)

    async def _write(self, request_id: int, payload: WritePayload) -> WorkerResponse:
        self._writing = True
        reports = None
        if payload.progress_bytes is not None:
            reports = ProgressReports(
                lambda count: self._channel.send(self._session.progress(request_id, count)),
                payload.progress_bytes,
            )
        try:
            started = time.perf_counter()
            result = await asyncio.to_thread(self._write_blocking, request_id, payload, reports)
            seconds = time.perf_counter() - started
        except Exception as exc:
            logger.warning("write to %s failed: %s: %s", payload.path, type(exc).__name__, exc)
            return failure(request_id, RequestType.WRITE_CHECKPOINT, exc)
        finally:
            if reports is not None:
                await reports.finish()  # the last report goes before the answer
            self._writing = False
            self._gate.finish(request_id)
            self._after_write()
            self._arenas.close_lingering()
        logger.debug("wrote %s in %.3f s", payload.path, seconds)
        try:
            msgspec.msgpack.encode(result)
        except (TypeError, msgspec.EncodeError, RecursionError):
            result = None  # torch-style writers may return futures or other local objects
        return WorkerResponse(
            request_id,
            RequestType.WRITE_CHECKPOINT,
            True,
            payload=WriteResultPayload(write_seconds=seconds, result=result),
        )

    def _write_blocking(
        self, request_id: int, payload: WritePayload, reports: ProgressReports | None = None
    ) -> Any:
        self._gate.check(request_id)
        # A write makes a few short-lived objects per tensor (views, buffers, manifest
        # leaves): tens of thousands of them set off the collector's full passes over the
        # heap, ~0.15 s of a 20,000-tensor save. None of them is cyclic garbage; collection
        # resumes when the write is done.
        with collection_paused():
            if reports is None:
                return self._materialize_and_write(request_id, payload)
            with observe_bytes_written(reports.add):
                return self._materialize_and_write(request_id, payload)

    def _materialize_and_write(self, request_id: int, payload: WritePayload) -> Any:
        state_dict = materialize(_whole(payload), self._arenas, self._layouts)
        if payload.staged_bytes is None:
            return self._write_materialized(request_id, payload, state_dict)
        self._follow_staging(request_id, payload, state_dict)
        result = self._write_materialized(request_id, payload, state_dict)
        # Answered only once staging is over (a rank may have written all its regions
        # before the trainer staged the ones other ranks write): the trainer reports
        # staging to a write that is still waiting for its answer.
        self._gate.wait_staged(request_id, None, _STAGING_STALL_S)
        return result

    def _write_materialized(self, request_id: int, payload: WritePayload, state_dict: Any) -> Any:
        if payload.commit is None:
            return self.writer.write(state_dict=state_dict, path=payload.path, **payload.kwargs)
        if self.group is not None:
            outcome = self.group.write_and_commit(
                self._writer_for(payload.commit),
                state_dict,
                shards_of(_whole(payload)),
                payload.path,
                payload.commit,
                begin_commit=lambda: self._gate.begin_commit(request_id),
            )
            self._regroup = outcome.regroup
            return outcome.result
        return commit.write_checkpoint(
            self._writer_for(payload.commit),
            state_dict,
            payload.path,
            format=payload.commit.format,
            overwrite=payload.commit.overwrite,
            metadata=payload.commit.metadata,
            before_commit=lambda: self._gate.begin_commit(request_id),
        )

    def _follow_staging(self, request_id: int, payload: WritePayload, state_dict: Any) -> None:
        """A write sent while the trainer still stages: a writer that writes each region once
        it is staged (``WRITES_WHILE_STAGING``) is told how to wait for it; for any other,
        wait here until every byte is staged."""

        def wait_staged(end: int | None) -> float:
            return self._gate.wait_staged(request_id, end, _STAGING_STALL_S)

        writer = self.writer if payload.commit is None else self._writer_for(payload.commit)
        if isinstance(state_dict, StagedStateDict) and getattr(
            writer, "WRITES_WHILE_STAGING", False
        ):
            state_dict.wait_staged = wait_staged
        else:
            wait_staged(None)

    def _writer_for(self, options: CommitOptions) -> Any:
        """The writer of a save's format and writer options, made once and kept (writers
        cache their plans between saves of one structure)."""
        key = (options.format, msgspec.json.encode(options.writer_options or {}))
        writer = self._format_writers.get(key)
        if writer is None:
            writer = create_writer(
                options.format, self._init.rank_info, **(options.writer_options or {})
            )
            self._format_writers[key] = writer
        return writer

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
    session = WorkerSession(channel.codec)
    frames = channel.frames()
    try:
        try:
            first = await anext(frames)
        except StopAsyncIteration:
            return 0  # the parent went away before the handshake
        try:
            _, request, _ = session.receive(first)
        except ProtocolError as exc:  # the session has not taken it: answer the fixed id
            await channel.send(failure(HANDSHAKE_ID, RequestType.INIT, exc))
            return 2
        assert isinstance(request.payload, InitPayload)  # the session checked
        worker = ServingWorker(channel, session, request.payload)
        try:
            worker.initialize()
        except BaseException as exc:
            await channel.send(session.respond(failure(request.request_id, RequestType.INIT, exc)))
            return 1
        ready = ReadyPayload(protocol_version=PROTOCOL_VERSION, pid=os.getpid())
        await channel.send(
            session.respond(
                WorkerResponse(request.request_id, RequestType.INIT, True, payload=ready)
            )
        )
        try:
            return await worker.run(frames)
        finally:
            await asyncio.to_thread(worker.close)
    except* (ConnectionError, ProtocolError) as broken:
        # A broken channel cannot carry an error report; the parent sees our exit instead.
        for cause in broken.exceptions:
            logger.error("channel to the parent broke: %s", cause)
    finally:
        await channel.aclose()
    return 2
