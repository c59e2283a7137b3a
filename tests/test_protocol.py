"""The sans-IO frame codec and messages, paired in memory (no sockets, no processes)."""

from __future__ import annotations

import ast
import enum
import gc
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiockpt._wire.protocol
import aiockpt._wire.session
from aiockpt._format.manifest import is_plain, plain_leaf
from aiockpt._format.tree import DictNode, LeafNode, ListNode, TupleNode
from aiockpt._wire.protocol import (
    PROTOCOL_VERSION,
    ArenaRef,
    BigIntValue,
    FrameDecoder,
    GcOptions,
    InitPayload,
    MessageCodec,
    PickledObject,
    PlainValue,
    RankInfo,
    ReadyPayload,
    RequestType,
    ShardSpec,
    StateDictPayload,
    TensorInArena,
    TensorInline,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
    WriteResultPayload,
    encode_frame,
)
from aiockpt._wire.tensors import value_from_leaf, value_leaf
from aiockpt.errors import ProtocolError, ProtocolVersionMismatch

codec = MessageCodec()


def sample_messages() -> list[WorkerRequest | WorkerResponse]:
    state = StateDictPayload(
        skeleton=DictNode(
            ["w", 0, "t"], [LeafNode(0), ListNode([LeafNode(1), LeafNode(2)]), TupleNode([])]
        ),
        leaves=[
            TensorInArena("bfloat16", [2, 3], offset=4096, nbytes=12),
            TensorInline("int64", [], b"\x01" * 8),
            PlainValue(b"\x00bytes"),
            BigIntValue(str(-(2**100))),
        ],
        arena=ArenaRef("/dev/shm/aiockpt-1", 8192),
    )
    init = InitPayload(
        protocol_version=PROTOCOL_VERSION,
        rank_info=RankInfo(1, 4),
        sys_path=["/a", "/b"],
        subprocess_init_fn="pkg.mod:init",
        subprocess_init_args=[1, "x", {"k": [1.5, None]}],
        checkpoint_writer_init_fn="pkg.mod:Writer",
        checkpoint_writer_init_args={"threads": 2},
        gc=GcOptions(disable_automatic=True),
    )
    return [
        WorkerRequest(0, RequestType.INIT, init),
        WorkerRequest(7, RequestType.PING),
        WorkerRequest(8, RequestType.WRITE_CHECKPOINT, WritePayload("/ck", state, {"a": 1})),
        WorkerRequest(9, RequestType.TERMINATE_PROCESS),
        WorkerResponse(0, RequestType.INIT, True, payload=ReadyPayload(PROTOCOL_VERSION, 42)),
        WorkerResponse(8, RequestType.WRITE_CHECKPOINT, True, payload=WriteResultPayload(0.5, [1])),
        WorkerResponse(
            8, RequestType.WRITE_CHECKPOINT, False, "OSError", "disk full", "Traceback ..."
        ),
        WorkerResponse(
            3, RequestType.WRITE_CHECKPOINT, True, payload=WriteResultPayload(0.1, {"x": 1})
        ),
        WorkerRequest(
            4,
            RequestType.WRITE_CHECKPOINT,
            WritePayload("/p", StateDictPayload(LeafNode(0), [PickledObject(b"\x80\x05N.")]), {}),
        ),
    ]


def decode_like(message: WorkerRequest | WorkerResponse, body: bytes) -> object:
    if isinstance(message, WorkerRequest):
        return codec.decode_request(body)
    return codec.decode_response(body)


@pytest.mark.parametrize(
    ("module", "allowed"),
    # the session's cancel gate is shared by the worker's loop and its write thread
    [(aiockpt._wire.protocol, set()), (aiockpt._wire.session, {"threading"})],
    ids=["protocol", "session"],
)
def test_protocol_modules_are_sans_io(module: ModuleType, allowed: set[str]) -> None:
    """The frames (protocol) and the rules (session) must not import asyncio, sockets or
    torch: they are pure data, framing and state, testable with no process at all."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    forbidden = {"asyncio", "socket", "torch", "anyio", "selectors", "threading"} - allowed
    assert not imported & forbidden


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: WorkerRequest | WorkerResponse) -> None:
    frame = codec.encode(message)
    (bodies,) = [FrameDecoder().feed(frame)]
    assert len(bodies) == 1
    assert decode_like(message, bodies[0]) == message


def test_a_write_requests_per_tensor_objects_are_not_tracked_by_the_collector() -> None:
    """A request of N tensors decodes into N leaves and N tree nodes; tracked, they set off
    collector passes in the worker for every big save (nothing in them can form a cycle)."""
    shard = ShardSpec(global_shape=[4, 2], offsets=[2, 0])
    leaves: list[Any] = [TensorInArena("float32", [2, 2], 64 * i, 16, shard) for i in range(3)]
    tree = DictNode(keys=["a", "b", "c"], children=[LeafNode(i) for i in range(3)])
    request = WorkerRequest(
        1,
        RequestType.WRITE_CHECKPOINT,
        WritePayload("/x", StateDictPayload(skeleton=tree, leaves=leaves)),
    )
    decoded = codec.decode_request(codec.encode(request)[4:])
    assert decoded == request
    assert isinstance(decoded.payload, WritePayload)
    payload = decoded.payload.state_dict
    assert isinstance(payload.skeleton, DictNode)
    untracked = [*payload.leaves, *payload.skeleton.children]
    untracked += [leaf.shard for leaf in payload.leaves if isinstance(leaf, TensorInArena)]
    assert len(untracked) == 9
    assert not any(map(gc.is_tracked, untracked))


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_split_and_coalesced_chunks_decode_the_same(cuts: list[int]) -> None:
    messages = sample_messages()
    stream = b"".join(codec.encode(m) for m in messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    decoder = FrameDecoder()
    bodies = [body for chunk in chunks for body in decoder.feed(chunk)]
    assert [decode_like(m, b) for m, b in zip(messages, bodies, strict=True)] == messages
    assert decoder.buffered == 0


def test_oversize_length_prefix_is_rejected_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(ProtocolError, match="exceeds the maximum frame size of 1024"):
        decoder.feed(struct.pack(">I", 1025))


def test_max_frame_size_is_validated() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)


def test_a_truncated_frame_stays_buffered() -> None:
    frame = codec.encode(WorkerRequest(1, RequestType.PING))
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.buffered == len(frame) - 1
    assert len(decoder.feed(frame[-1:])) == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    """Garbage yields frames or a ProtocolError, never another exception or a hang."""
    decoder = FrameDecoder(max_frame_size=4096)
    try:
        bodies = decoder.feed(data)
    except ProtocolError:
        return
    for body in bodies:
        with pytest.raises(ProtocolError):
            codec.decode_request(body + b"\xc1")  # 0xc1 is never valid msgpack
        try:
            codec.decode_request(body)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_wrong_types_are_protocol_errors(value: object) -> None:
    body = msgspec.msgpack.encode(value)
    for decode in (codec.decode_request, codec.decode_response):
        try:
            decode(body)
        except ProtocolError:
            pass


def test_a_response_is_not_mistaken_for_a_request() -> None:
    response = WorkerResponse(8, RequestType.WRITE_CHECKPOINT, False, "OSError", "disk full")
    with pytest.raises(ProtocolError):
        codec.decode_request(codec.encode(response)[4:])


def test_message_with_wrong_field_type_is_a_protocol_error() -> None:
    body = msgspec.msgpack.encode({"request_id": "seven", "request_type": "ping"})
    with pytest.raises(ProtocolError, match="malformed request frame"):
        codec.decode_request(body)


def test_version_mismatch_is_reported_even_if_the_rest_no_longer_decodes() -> None:
    future_init = {
        "request_id": 0,
        "request_type": "init",
        "payload": {"type": "init", "protocol_version": PROTOCOL_VERSION + 1, "new": [1]},
    }
    with pytest.raises(ProtocolVersionMismatch, match=f"version {PROTOCOL_VERSION + 1}"):
        codec.check_handshake_request(msgspec.msgpack.encode(future_init))
    ready = {
        "request_id": 0,
        "request_type": "init",
        "success": True,
        "payload": {"type": "ready", "protocol_version": 0, "pid": 1},
    }
    with pytest.raises(ProtocolVersionMismatch, match="the worker speaks"):
        codec.check_handshake_response(msgspec.msgpack.encode(ready))


def test_matching_handshake_passes() -> None:
    init, *_ = sample_messages()
    codec.check_handshake_request(msgspec.msgpack.encode(init))


def test_frame_length_limit() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


# --- non-tensor leaves ------------------------------------------------------------------------

#: ints on both sides of msgpack's 64-bit range, and far beyond it
INTS = [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 2**200, -(2**1000)]


@pytest.mark.parametrize("value", INTS, ids=lambda v: f"{'-' if v < 0 else ''}{v.bit_length()}bit")
def test_every_int_leaf_crosses_the_channel_exactly(value: int) -> None:
    """The trainer describes a leaf, the frame is encoded and decoded, the worker rebuilds
    it: the same int, of type int (ints beyond 64 bits failed in the encoder, keyless)."""
    payload = StateDictPayload(LeafNode(0), [value_leaf(("k",), value, allow_pickle=False)])
    message = WorkerRequest(1, RequestType.WRITE_CHECKPOINT, WritePayload("/p", payload, {}))
    (body,) = FrameDecoder().feed(codec.encode(message))
    decoded = codec.decode_request(body)
    assert isinstance(decoded.payload, WritePayload)
    leaf = decoded.payload.state_dict.leaves[0]
    assert isinstance(leaf, (PlainValue, BigIntValue, PickledObject))
    rebuilt = value_from_leaf(leaf)
    assert rebuilt == value and type(rebuilt) is int


class Color(enum.IntEnum):
    RED = 1


UNENCODABLE = {
    "numpy-float64": numpy.float64(1.5),
    "int-enum": Color.RED,
    "lone-surrogate": "\ud800",
    "int-too-long-for-text": 10**5000,
}


@pytest.mark.parametrize("case", list(UNENCODABLE))
def test_a_leaf_the_channel_cannot_carry_fails_in_the_caller_naming_its_key(case: str) -> None:
    with pytest.raises(TypeError, match=r"'opt\.state\.0'"):
        value_leaf(("opt", "state", 0), UNENCODABLE[case], allow_pickle=False)


def test_subclasses_of_plain_types_are_pickled_when_allowed_and_keep_their_type() -> None:
    leaf = value_leaf(("c",), Color.RED, allow_pickle=True)
    assert isinstance(leaf, PickledObject)
    assert type(value_from_leaf(leaf)) is Color


class Label(str):
    pass


#: plain and not quite plain values: the channel and the manifest must draw the line alike
PLAIN = [0, 2**70, 1.5, float("nan"), "s", True, None, b"b"]
NOT_PLAIN = [Color.RED, numpy.float64(1.5), Label("s"), bytearray(b"b"), [1], object()]


@pytest.mark.parametrize(
    ("value", "plain"),
    [(v, True) for v in PLAIN] + [(v, False) for v in NOT_PLAIN],
    ids=lambda v: type(v).__name__,
)
def test_the_channel_and_the_manifest_agree_on_what_is_plain(value: Any, plain: bool) -> None:
    assert is_plain(value) is plain
    assert (plain_leaf(value) is not None) is plain
    wire = value_leaf(("k",), value, allow_pickle=True)
    assert isinstance(wire, (PlainValue, BigIntValue)) is plain
    assert isinstance(wire, PickledObject) is not plain
