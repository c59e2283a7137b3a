"""Fuzzing the channel: the frame decoder and every message type, in memory and end to end.

``tests/test_protocol.py`` checks hand-written samples and plain random bytes; here messages
are generated from the protocol's own type declarations (``msgspec.inspect``), so every request
and response type, every payload and every leaf is covered, and stays covered as the protocol
grows: a field of a kind the generator does not know fails loudly instead of going unfuzzed.
Whatever arrives, decoding yields a valid message or a ``ProtocolError``, never another
exception; a real worker fed garbage exits or answers with an error, never hangs, and the
parent raises a clear error within a bound.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiockpt._wire.protocol as protocol
from aiockpt._format.tree import DictNode, LeafNode
from aiockpt._trainer.checkpoint_process import CheckpointProcess
from aiockpt._wire.protocol import (
    PROTOCOL_VERSION,
    ArenaPayload,
    ArenaRef,
    CancelPayload,
    CommitOptions,
    FrameDecoder,
    InitPayload,
    MessageCodec,
    PickledObject,
    PlainValue,
    RankInfo,
    RequestType,
    StateDictPayload,
    TensorInArena,
    TensorInline,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
    WriteResultPayload,
    encode_frame,
)
from aiockpt.errors import AiockptError, ProtocolError, WorkerCrashed

REPO = Path(__file__).resolve().parents[1]
codec = MessageCodec()
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies from the protocol's own declarations ------------------------------------------

#: msgspec's ``Any``: what msgpack carries (dict keys are str on this channel)
ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
#: how deep generated structs may nest (the state-dict skeleton is recursive)
MAX_DEPTH = 4


def _has_struct(t: mi.Type) -> bool:
    if isinstance(t, mi.StructType):
        return True
    if isinstance(t, mi.UnionType):
        return any(_has_struct(u) for u in t.types)
    if isinstance(t, (mi.ListType, mi.VarTupleType)):
        return _has_struct(t.item_type)
    if isinstance(t, mi.DictType):
        return _has_struct(t.value_type)
    return False


class Strategies:
    """Hypothesis strategies for msgspec types, one per (struct, depth) so that recursive
    types stay finite."""

    def __init__(self) -> None:
        self._structs: dict[tuple[type, int], st.SearchStrategy[Any]] = {}

    def of(self, t: mi.Type, depth: int = 0) -> st.SearchStrategy[Any]:
        if isinstance(t, mi.Metadata):
            return self.of(t.type, depth)
        if isinstance(t, mi.AnyType):
            return ANY_VALUE
        if isinstance(t, mi.NoneType):
            return st.none()
        if isinstance(t, mi.BoolType):
            return st.booleans()
        if isinstance(t, mi.IntType):
            return st.integers(-(2**63), 2**64 - 1)
        if isinstance(t, mi.FloatType):
            return st.floats()
        if isinstance(t, mi.StrType):
            return st.text(max_size=16)
        if isinstance(t, mi.BytesType):
            return st.binary(max_size=16)
        if isinstance(t, mi.EnumType):
            return st.sampled_from(list(t.cls))
        if isinstance(t, mi.LiteralType):
            return st.sampled_from(list(t.values))
        if isinstance(t, mi.UnionType):
            return st.one_of([self.of(u, depth) for u in t.types])
        if isinstance(t, (mi.ListType, mi.VarTupleType, mi.DictType)):
            if depth >= MAX_DEPTH and _has_struct(t):
                # recursion ends here: an empty container is valid at any depth
                empty: Any = {} if isinstance(t, mi.DictType) else []
                return st.just(tuple(empty) if isinstance(t, mi.VarTupleType) else empty)
            if isinstance(t, mi.DictType):
                return st.dictionaries(
                    self.of(t.key_type, depth), self.of(t.value_type, depth), max_size=3
                )
            items = st.lists(self.of(t.item_type, depth), max_size=3)
            return items.map(tuple) if isinstance(t, mi.VarTupleType) else items
        if isinstance(t, mi.TupleType):
            return st.tuples(*(self.of(u, depth) for u in t.item_types))
        if isinstance(t, mi.StructType):
            key = (t.cls, depth)
            if key not in self._structs:
                self._structs[key] = st.deferred(lambda: self._struct(t, depth + 1))
            return self._structs[key]
        raise TypeError(
            f"no fuzzing strategy for {t!r}: the protocol grew a kind of field this test does "
            "not know; teach Strategies.of about it"
        )

    def _struct(self, t: mi.StructType, depth: int) -> st.SearchStrategy[Any]:
        required = {f.name: self.of(f.type, depth) for f in t.fields if f.required}
        optional = {f.name: self.of(f.type, depth) for f in t.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional).map(lambda kw: t.cls(**kw))


STRATEGIES = Strategies()
REQUESTS = STRATEGIES.of(mi.type_info(WorkerRequest))
RESPONSES = STRATEGIES.of(mi.type_info(WorkerResponse))
MESSAGES = REQUESTS | RESPONSES


def reachable_structs(t: mi.Type, found: set[type] | None = None) -> set[type]:
    """Every Struct class a message of type ``t`` can contain."""
    found = set() if found is None else found
    if isinstance(t, mi.Metadata):
        return reachable_structs(t.type, found)
    if isinstance(t, mi.StructType):
        if t.cls in found:
            return found
        found.add(t.cls)
        for f in t.fields:
            reachable_structs(f.type, found)
    elif isinstance(t, mi.UnionType):
        for u in t.types:
            reachable_structs(u, found)
    elif isinstance(t, (mi.ListType, mi.VarTupleType)):
        reachable_structs(t.item_type, found)
    elif isinstance(t, mi.DictType):
        reachable_structs(t.value_type, found)
    elif isinstance(t, mi.TupleType):
        for u in t.item_types:
            reachable_structs(u, found)
    return found


def decode(message: WorkerRequest | WorkerResponse, body: bytes) -> Any:
    if isinstance(message, WorkerRequest):
        return codec.decode_request(body)
    return codec.decode_response(body)


def decodes_or_protocol_error(body: bytes) -> None:
    """The property every body must have, whichever side reads it: each decoder (and each
    handshake probe) yields a message of its type or raises ProtocolError, nothing else."""
    for decoder, kind in (
        (codec.decode_request, WorkerRequest),
        (codec.decode_response, WorkerResponse),
    ):
        try:
            message = decoder(body)
        except ProtocolError:
            continue
        assert isinstance(message, kind)
        codec.encode(message)  # a decoded message is a valid message: it encodes again
    for probe in (codec.check_handshake_request, codec.check_handshake_response):
        try:
            probe(body)
        except ProtocolError:  # ProtocolVersionMismatch included
            pass


def test_the_fuzzed_messages_cover_every_message_type_in_the_protocol() -> None:
    """Generating WorkerRequest and WorkerResponse reaches every Struct protocol.py defines,
    so fuzzing the two envelopes fuzzes every payload, leaf and option type."""
    reachable = reachable_structs(mi.type_info(WorkerRequest))
    reachable |= reachable_structs(mi.type_info(WorkerResponse))
    declared = {
        obj
        for name, obj in vars(protocol).items()
        if isinstance(obj, type)
        and issubclass(obj, msgspec.Struct)
        and obj.__module__ == protocol.__name__
        and not name.startswith("_")
    }
    assert declared - reachable == set(), "Structs no message carries: are they messages?"


# --- in memory ----------------------------------------------------------------------------


@FUZZ
@given(message=MESSAGES, cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_every_generated_message_round_trips_through_frames(
    message: WorkerRequest | WorkerResponse, cuts: list[int]
) -> None:
    frame = codec.encode(message)
    points = sorted({c % (len(frame) + 1) for c in cuts})
    decoder = FrameDecoder()
    bodies = [
        body
        for a, b in zip([0, *points], [*points, len(frame)], strict=True)
        for body in decoder.feed(frame[a:b])
    ]
    assert len(bodies) == 1 and decoder.buffered == 0
    # Compared as encoded bytes: NaN floats are not equal to themselves.
    assert codec.encode(decode(message, bodies[0])) == frame


def _paths(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _paths(value, (*path, index))


def _mutate(tree: Any, path: tuple[Any, ...], change: Callable[[Any, Any], Any]) -> Any:
    """``tree`` with the container holding ``path`` changed by ``change(container, key)``
    (or the whole tree replaced, for the root)."""
    if not path:
        return change(None, None)
    head, rest = path[0], path[1:]
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    if rest:
        copy[head] = _mutate(tree[head], rest, change)
        return copy
    return change(copy, head)


#: values of the wrong type for most fields, and a few of the right type but hostile
WRONG_VALUES = (
    ANY_VALUE
    | st.sampled_from([-1, 2**64 - 1, -(2**63), "", "\0", "../..", [[]], {"type": "nope"}])
    | st.sampled_from([e.value for e in RequestType])
)


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    """A valid message, turned into plain data, with one thing changed: a value replaced by
    one of another type, a field dropped, an unknown field added, an item appended or a
    struct tag changed."""
    message = draw(MESSAGES)
    tree = msgspec.to_builtins(message, builtin_types=(bytes,))
    path = draw(st.sampled_from(list(_paths(tree))))
    operation = draw(st.sampled_from(["replace", "drop", "add", "append", "retag"]))
    value = draw(WRONG_VALUES)

    def change(container: Any, key: Any) -> Any:
        if container is None:
            return value
        target = container[key]
        if operation == "drop":
            del container[key]
        elif operation == "add" and isinstance(target, dict):
            target = {**target, draw(st.text(max_size=8)): value}
        elif operation == "append" and isinstance(target, list):
            target = [*target, value]
        elif operation == "retag" and isinstance(target, dict) and "type" in target:
            target = {**target, "type": draw(st.text(max_size=8))}
        elif operation == "retag" and isinstance(target, list) and target:
            target = [draw(st.text(max_size=8)), *target[1:]]  # array-like: the tag is first
        else:
            target = value
        if operation != "drop":
            container[key] = target
        return container

    return msgspec.msgpack.encode(_mutate(tree, path, change))


@FUZZ
@given(body=mutated_bodies())
def test_mutated_messages_decode_or_are_protocol_errors(body: bytes) -> None:
    decodes_or_protocol_error(body)


@FUZZ
@given(
    request_id=WRONG_VALUES,
    request_type=WRONG_VALUES,
    payload=WRONG_VALUES | STRATEGIES.of(mi.type_info(InitPayload)).map(msgspec.to_builtins),
    extra=st.dictionaries(st.text(max_size=8), ANY_VALUE, max_size=2),
)
def test_valid_envelope_with_garbage_payload(
    request_id: Any, request_type: Any, payload: Any, extra: dict[str, Any]
) -> None:
    envelope = {"request_id": request_id, "request_type": request_type, "payload": payload}
    decodes_or_protocol_error(msgspec.msgpack.encode(envelope))
    decodes_or_protocol_error(msgspec.msgpack.encode({**envelope, **extra, "success": True}))


@FUZZ
@given(message=MESSAGES, data=st.data())
def test_truncated_or_extended_bodies_are_protocol_errors(
    message: WorkerRequest | WorkerResponse, data: st.DataObject
) -> None:
    body = codec.encode(message)[4:]
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(ProtocolError):
        decode(message, body[:cut])  # a strict prefix of a msgpack map never decodes
    with pytest.raises(ProtocolError):
        decode(message, body + data.draw(st.binary(min_size=1, max_size=8)))


@FUZZ
@given(
    message=MESSAGES,
    flips=st.lists(st.tuples(st.integers(0), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_corrupted_bytes_decode_or_are_protocol_errors(
    message: WorkerRequest | WorkerResponse, flips: list[tuple[int, int]]
) -> None:
    body = bytearray(codec.encode(message)[4:])
    for position, mask in flips:
        body[position % len(body)] ^= mask
    decodes_or_protocol_error(bytes(body))


@FUZZ
@given(
    messages=st.lists(MESSAGES, min_size=1, max_size=4),
    max_frame_size=st.integers(1, 1 << 16),
    excess=st.integers(1, 2**32 - 1),
    data=st.data(),
)
def test_an_oversize_length_prefix_anywhere_in_the_stream_is_a_protocol_error(
    messages: list[WorkerRequest | WorkerResponse],
    max_frame_size: int,
    excess: int,
    data: st.DataObject,
) -> None:
    """Frames before the bad prefix come out (fed one by one); the bad one raises as soon as
    its 4 bytes are in, however large its claimed body and however the bytes are split."""
    frames = [codec.encode(m) for m in messages]
    frames = [f for f in frames if len(f) - 4 <= max_frame_size]
    bad_length = min(max_frame_size + excess, 2**32 - 1)
    if bad_length <= max_frame_size:
        return
    decoder = FrameDecoder(max_frame_size)
    for frame in frames:
        assert decoder.feed(frame) == [frame[4:]]
    prefix = struct.pack(">I", bad_length)
    split = data.draw(st.integers(0, 3))
    assert decoder.feed(prefix[:split]) == []
    with pytest.raises(ProtocolError, match="exceeds the maximum frame size"):
        decoder.feed(prefix[split:] + data.draw(st.binary(max_size=8)))


@FUZZ
@given(max_frame_size=st.integers(1, 4096), data=st.data())
def test_a_frame_of_exactly_the_maximum_size_is_accepted(
    max_frame_size: int, data: st.DataObject
) -> None:
    body = data.draw(st.binary(min_size=max_frame_size, max_size=max_frame_size))
    assert FrameDecoder(max_frame_size).feed(encode_frame(body)) == [body]


@FUZZ
@given(messages=st.lists(MESSAGES, min_size=1, max_size=4), data=st.data())
def test_a_stream_cut_anywhere_keeps_the_incomplete_frame_buffered(
    messages: list[WorkerRequest | WorkerResponse], data: st.DataObject
) -> None:
    frames = [codec.encode(m) for m in messages]
    stream = b"".join(frames)
    cut = data.draw(st.integers(0, len(stream)))
    decoder = FrameDecoder()
    bodies = decoder.feed(stream[:cut])
    complete = sum(len(f) for f in frames[: len(bodies)])
    assert bodies == [f[4:] for f in frames[: len(bodies)]]
    assert (
        decoder.buffered == cut - complete < (len(frames[len(bodies)]) if cut < len(stream) else 1)
    )


def invalid_utf8_request() -> bytes:
    """A PING whose request type is not valid UTF-8 (one flipped byte of a real frame)."""
    body = codec.encode(WorkerRequest(7, RequestType.PING))[4:]
    return body.replace(b"ping", b"p\xffng")


def test_invalid_utf8_is_a_protocol_error() -> None:
    body = invalid_utf8_request()
    with pytest.raises(ProtocolError):
        codec.decode_request(body)
    with pytest.raises(ProtocolError):
        codec.decode_response(body)


def deeply_nested_request(depth: int) -> bytes:
    """A well-formed INIT whose ``subprocess_init_args`` nests ``depth`` lists deep."""
    init = InitPayload(PROTOCOL_VERSION, RankInfo(), [], None, [], "x:y", {})
    body = codec.encode(WorkerRequest(0, RequestType.INIT, init))[4:]
    marker = msgspec.msgpack.encode("subprocess_init_args")
    at = body.index(marker) + len(marker)
    assert body[at] == 0x90  # the empty list we replace
    return body[:at] + b"\x91" * depth + b"\xc0" + body[at + 1 :]


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_frames_are_protocol_errors(depth: int) -> None:
    body = deeply_nested_request(depth)
    with pytest.raises(ProtocolError):
        codec.decode_request(body)
    with pytest.raises(ProtocolError):
        codec.check_handshake_request(body)


# --- end to end: a real worker ------------------------------------------------------------

#: a worker fed garbage must be gone, or have answered, within this (it is not a benchmark)
WORKER_BOUND_S = 30.0
#: the parent must have raised its error within this after the garbage
PARENT_BOUND_S = 5.0


class BareWorker:
    """``python -m aiockpt._worker`` over a socketpair, with no CheckpointProcess in front:
    the test writes whatever bytes it likes and reads frames back (blocking, with timeouts)."""

    def __init__(self) -> None:
        parent_end, child_end = socket.socketpair()
        with child_end:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aiockpt._worker", "--fd", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        self.sock = parent_end
        self.sock.settimeout(WORKER_BOUND_S)
        self._decoder = FrameDecoder()
        self._frames: list[bytes] = []

    def send(self, data: bytes | WorkerRequest) -> None:
        self.sock.sendall(codec.encode(data) if isinstance(data, WorkerRequest) else data)

    def receive(self) -> WorkerResponse | None:
        """The next response, or None at EOF."""
        while not self._frames:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return None
            self._frames += self._decoder.feed(chunk)
        return codec.decode_response(self._frames.pop(0))

    def handshake(self) -> None:
        init = InitPayload(
            PROTOCOL_VERSION, RankInfo(), [], None, [], "tests.workers:RawWriter", {}
        )
        self.send(WorkerRequest(0, RequestType.INIT, init))
        response = self.receive()
        assert response is not None and response.success, response

    def exit_code(self) -> int:
        """Wait for the worker to exit; a worker that hangs fails the test (and is killed)."""
        try:
            return self.process.wait(timeout=WORKER_BOUND_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the worker hung for {WORKER_BOUND_S} s on garbage") from None

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


#: bare workers the module's end-to-end tests take from the pool: 3 + 1 + 1
POOL_SIZE = 5


@pytest.fixture(scope="module")
def bare_workers() -> Iterator[Callable[[], BareWorker]]:
    """Bare workers all started at once when the first test asks: each imports torch, and
    started together they cost about what one or two do. Each test takes fresh ones and
    closes them; the module's end closes the rest. (Set up before and torn down after every
    test's leak check, which therefore sees them as already there.)"""
    pool = [BareWorker() for _ in range(POOL_SIZE)]
    available = iter(pool)

    def take() -> BareWorker:
        worker = next(available, None)
        return worker if worker is not None else BareWorker()

    yield take
    for worker in pool:
        worker.close()


def test_garbage_ends_a_real_worker_with_an_answer_or_an_exit(
    bare_workers: Callable[[], BareWorker],
) -> None:
    """Each kind of garbage, sent to its own worker:
    in the handshake the worker answers with a ProtocolError; after it, the channel has lost
    its framing and the worker exits with code 2 (1 for the nesting it cannot even decode)."""
    cases: dict[str, tuple[bool, bytes, set[int]]] = {
        # name: (handshake first, the bytes, accepted exit codes)
        "garbage body as the handshake": (False, encode_frame(b"\xc1garbage"), {2}),
        "garbage body after the handshake": (True, encode_frame(b"\x92\x01"), {2}),
        "nested 100000 deep after the handshake": (
            True,
            encode_frame(deeply_nested_request(100_000)),
            {1, 2},
        ),
    }
    workers = {name: bare_workers() for name in cases}
    try:
        for name, (handshake, garbage, _) in cases.items():
            worker = workers[name]
            if handshake:
                worker.handshake()
            worker.send(garbage)
        for name, (handshake, _, codes) in cases.items():
            worker = workers[name]
            if not handshake:  # the handshake is answered, even when it makes no sense
                response = worker.receive()
                assert response is not None and not response.success, (name, response)
                assert response.error_type == "aiockpt.errors.ProtocolError", (name, response)
            assert worker.receive() is None, name  # nothing more: the channel is closed
            assert worker.exit_code() in codes, name
    finally:
        for worker in workers.values():
            worker.close()


def hostile_requests(shm_file: str, target: str) -> list[tuple[WorkerRequest, bool]]:
    """Well-formed requests with values no parent sends; (request, answered with success).
    ``target`` is a path no write can create (under a regular file)."""
    write = RequestType.WRITE_CHECKPOINT

    def writing(payload: StateDictPayload, **options: Any) -> WritePayload:
        return WritePayload(target, payload, **options)

    one = DictNode(["a"], [LeafNode(0)])
    requests = [
        (RequestType.PING, None, True),
        (RequestType.MAP_ARENA, ArenaPayload(ArenaRef(shm_file + "-missing", 64)), False),
        (RequestType.RELEASE_ARENA, ArenaPayload(ArenaRef("/never/mapped", 64)), True),
        (RequestType.CANCEL, CancelPayload(123456), True),
        (RequestType.CANCEL, None, False),
        (RequestType.PING, CancelPayload(1), True),
        (write, None, False),
        (
            RequestType.INIT,
            InitPayload(PROTOCOL_VERSION, RankInfo(), [], None, [], "x:y", {}),
            False,
        ),
        (write, writing(StateDictPayload(LeafNode(5), [])), False),
        (
            write,
            writing(StateDictPayload(LeafNode(0), [TensorInArena("float32", [4], 0, 16)])),
            False,
        ),
        (
            write,
            writing(StateDictPayload(LeafNode(0), [TensorInline("nope", [1], b"1234")])),
            False,
        ),
        (
            write,
            writing(StateDictPayload(LeafNode(0), [TensorInline("float32", [-1], b"")])),
            False,
        ),
        (
            write,
            writing(StateDictPayload(LeafNode(0), [TensorInline("float32", [2**40, 2**40], b"")])),
            False,
        ),
        (write, writing(StateDictPayload(one, [PickledObject(b"not a pickle")])), False),
        (
            write,
            writing(StateDictPayload(one, [PlainValue(1)]), commit=CommitOptions("no:Such")),
            False,
        ),
        (
            write,
            writing(StateDictPayload(one, [PlainValue(1)]), commit=CommitOptions("dcp")),
            False,
        ),
    ]
    return [
        (WorkerRequest(i + 1, kind, payload), ok) for i, (kind, payload, ok) in enumerate(requests)
    ]


def test_well_formed_requests_with_hostile_values_are_answered_and_the_worker_serves_on(
    tmp_path: Path, bare_workers: Callable[[], BareWorker]
) -> None:
    shm_file = tmp_path / "not-an-arena"
    shm_file.write_bytes(b"\0" * 64)
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory would have to be")
    worker = bare_workers()
    try:
        worker.handshake()
        for request, succeeds in hostile_requests(str(shm_file), str(blocker / "ck")):
            worker.send(request)
            response = worker.receive()
            assert response is not None, f"the worker died on {request}"
            assert response.request_id == request.request_id
            assert response.success == succeeds, (request, response)
            if not succeeds:
                assert response.error_type and response.error_msg, response
        worker.send(WorkerRequest(999, RequestType.TERMINATE_PROCESS))
        assert worker.receive() is not None
        assert worker.exit_code() == 0
    finally:
        worker.close()
    assert sorted(os.listdir(tmp_path)) == ["a-file", "not-an-arena"]


def test_mapping_an_arena_of_the_wrong_size_is_answered_not_fatal(
    tmp_path: Path, bare_workers: Callable[[], BareWorker]
) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"\0" * 64)
    worker = bare_workers()
    try:
        worker.handshake()
        arena = ArenaPayload(ArenaRef(str(small), 1 << 40))
        worker.send(WorkerRequest(1, RequestType.MAP_ARENA, arena))
        response = worker.receive()
        assert response is not None, f"the worker exited with {worker.exit_code()} instead"
        assert not response.success and response.error_type, response
    finally:
        worker.close()


def light_process() -> CheckpointProcess:
    """A worker whose writer does not import torch.distributed (faster to start and stop)."""
    return CheckpointProcess(checkpoint_writer_init_fn="tests.workers:RawWriter")


async def test_the_parent_raises_a_clear_error_when_either_end_garbles_the_channel() -> None:
    """Garbage towards the worker ends it (exit code 2): the parent's pending and later
    requests fail with WorkerCrashed naming that. Garbage towards the parent: its pending
    request fails with ProtocolError, the worker is killed, later requests fail clearly."""
    to_worker, to_parent = light_process(), light_process()
    try:
        await asyncio.gather(to_worker.start(), to_parent.start())

        assert to_worker._channel is not None
        to_worker._channel._writer.write(encode_frame(b"\xc1not msgpack"))
        started = time.perf_counter()
        with pytest.raises((WorkerCrashed, ProtocolError)):
            async with asyncio.timeout(WORKER_BOUND_S):
                await to_worker.ping()
        # The worker exits through the interpreter's normal shutdown (0.3 s to over 1 s with
        # torch loaded, on a busy machine), and the parent reports the exit once it has
        # happened: a bound that says "promptly, never hung", not a latency target.
        assert time.perf_counter() - started < PARENT_BOUND_S
        with pytest.raises(WorkerCrashed, match="exited with code 2") as crashed:
            async with asyncio.timeout(WORKER_BOUND_S):
                while True:  # until the exit monitor has seen the exit (it is not a poll)
                    await to_worker.ping()
        assert crashed.value.returncode == 2

        assert to_parent._channel is not None
        pid = to_parent.pid
        assert pid is not None
        pending = asyncio.ensure_future(to_parent.ping())
        await asyncio.sleep(0)  # the PING is sent
        to_parent._channel._reader.feed_data(encode_frame(b"\xc1not msgpack"))
        started = time.perf_counter()
        with pytest.raises(ProtocolError, match="malformed response frame") as garbled:
            async with asyncio.timeout(WORKER_BOUND_S):
                await pending
        assert time.perf_counter() - started < PARENT_BOUND_S
        assert garbled.value.pid == pid  # names the worker at the other end
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            async with asyncio.timeout(WORKER_BOUND_S):
                while True:
                    await to_parent.ping()
    finally:
        await asyncio.gather(to_worker.close(), to_parent.close())


def test_a_response_the_parent_cannot_decode_never_hangs_its_requests() -> None:
    """One flipped byte on the channel (or a deeply nested result) must fail the pending
    requests with ProtocolError, not leave them waiting forever. One loop suffices: the
    reader's error handling is the same on both."""
    # A well-formed response whose result (msgspec's Any) nests 100000 lists deep.
    result = WriteResultPayload(0.0, "RESULT")
    response = WorkerResponse(10**9, RequestType.WRITE_CHECKPOINT, True, payload=result)
    body = codec.encode(response)[4:]
    frames = {
        "nested": body.replace(msgspec.msgpack.encode("RESULT"), b"\x91" * 100_000 + b"\xc0"),
        "invalid utf-8": body.replace(b"RESULT", b"RES\xffLT"),
    }

    async def feed(proc: CheckpointProcess, frame: bytes) -> BaseException | None:
        assert proc._channel is not None
        pending = asyncio.ensure_future(proc.ping())
        await asyncio.sleep(0)  # the PING is sent
        proc._channel._reader.feed_data(encode_frame(frame))
        try:
            async with asyncio.timeout(1.0):
                await pending
        except TimeoutError:
            return None  # hung
        except AiockptError as exc:
            return exc
        return None

    async def scenario() -> dict[str, BaseException | None]:
        procs = {name: light_process() for name in frames}
        try:
            await asyncio.gather(*(proc.start() for proc in procs.values()))
            outcomes = await asyncio.gather(*(feed(procs[n], f) for n, f in frames.items()))
            return dict(zip(frames, outcomes, strict=True))
        finally:
            await asyncio.gather(*(proc.close() for proc in procs.values()))

    outcomes = asyncio.run(scenario())
    hung = [name for name, outcome in outcomes.items() if not isinstance(outcome, ProtocolError)]
    assert hung == [], f"pending requests hung or failed unclearly: {outcomes}"
