"""The channel's rules, two sessions paired in memory as h11's tests pair connections: frames
cross as bytes, split and coalesced at every point, with no socket and no process."""

from __future__ import annotations

import threading

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiockpt._format.tree import DictNode, LeafNode, Node
from aiockpt._wire.protocol import (
    PROTOCOL_VERSION,
    ArenaRef,
    CancelPayload,
    FrameDecoder,
    InitPayload,
    MessageCodec,
    PlainValue,
    RankInfo,
    ReadyPayload,
    RepeatedStateDict,
    RequestType,
    StateDictPayload,
    TensorInArena,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
)
from aiockpt._wire.session import (
    HANDSHAKE_ID,
    ParentSession,
    ParentSessionState,
    Received,
    Route,
    WorkerSession,
    WorkerSessionState,
    WriteCancelled,
    WriteGate,
)
from aiockpt.errors import ProtocolError, ProtocolVersionMismatch

codec = MessageCodec()
INIT = InitPayload(
    protocol_version=PROTOCOL_VERSION,
    rank_info=RankInfo(),
    sys_path=[],
    subprocess_init_fn=None,
    subprocess_init_args=[],
    checkpoint_writer_init_fn="aiockpt.writers.dcp:DcpWriter",
    checkpoint_writer_init_args={},
)


class Pair:
    """A trainer session and a worker session joined by two byte streams."""

    def __init__(self) -> None:
        self.parent = ParentSession()
        self.worker = WorkerSession()
        self._to_worker = FrameDecoder()
        self._to_parent = FrameDecoder()

    def send(self, request: WorkerRequest) -> list[Received]:
        return [self.worker.receive(body) for body in self._to_worker.feed(codec.encode(request))]

    def answer(self, response: WorkerResponse) -> list[WorkerResponse | None]:
        frame = codec.encode(self.worker.respond(response))
        return [self.parent.receive(body) for body in self._to_parent.feed(frame)]

    def ready(self) -> None:
        [(route, init, _)] = self.send(self.parent.handshake(INIT))
        assert route is Route.HANDSHAKE and init.request_id == HANDSHAKE_ID
        ready = ReadyPayload(PROTOCOL_VERSION, 1234)
        [response] = self.answer(
            WorkerResponse(init.request_id, init.request_type, True, payload=ready)
        )
        assert response is not None and self.parent.state is ParentSessionState.READY


def test_handshake_first_then_unique_increasing_ids_each_answered_once() -> None:
    pair = Pair()
    with pytest.raises(ProtocolError, match="handshaking"):
        pair.parent.request(RequestType.PING)  # nothing before the handshake is answered
    pair.ready()
    requests = [pair.parent.request(RequestType.PING) for _ in range(3)]
    assert [r.request_id for r in requests] == [1, 2, 3]
    routes = [pair.send(r)[0].route for r in requests]
    assert routes == [Route.IMMEDIATE] * 3
    assert pair.parent.outstanding == {1, 2, 3}
    for request in reversed(requests):  # answered in any order
        [response] = pair.answer(WorkerResponse(request.request_id, request.request_type, True))
        assert response is not None and response.request_id == request.request_id
    assert pair.parent.outstanding == frozenset()
    # An answer the worker gives twice, or to an id never sent, means it is confused.
    stray = codec.encode(WorkerResponse(2, RequestType.PING, True))
    with pytest.raises(ProtocolError, match="never sent or is answered already"):
        pair.parent.receive(stray[4:])
    with pytest.raises(ProtocolError, match="not awaiting one"):
        pair.worker.respond(WorkerResponse(2, RequestType.PING, True))


def test_abandoned_requests_have_their_answers_dropped() -> None:
    pair = Pair()
    pair.ready()
    ping = pair.parent.request(RequestType.PING)
    pair.send(ping)
    pair.parent.abandon(ping.request_id)  # a ping that timed out on the trainer's side
    assert pair.answer(WorkerResponse(ping.request_id, RequestType.PING, True)) == [None]
    assert pair.parent.outstanding == frozenset()


def test_the_first_answer_must_be_the_handshakes() -> None:
    pair = Pair()
    pair.parent.handshake(INIT)
    body = codec.encode(WorkerResponse(5, RequestType.PING, True))[4:]
    with pytest.raises(ProtocolError, match="never sent"):
        pair.parent.receive(body)


def test_a_failed_handshake_allows_nothing_else() -> None:
    pair = Pair()
    pair.send(pair.parent.handshake(INIT))
    [response] = pair.answer(WorkerResponse(HANDSHAKE_ID, RequestType.INIT, False, "E", "no"))
    assert response is not None and not response.success
    assert pair.parent.state is ParentSessionState.FAILED
    with pytest.raises(ProtocolError, match="failed"):
        pair.parent.request(RequestType.PING)
    with pytest.raises(ProtocolError, match="already"):
        pair.parent.handshake(INIT)


def test_answer_of_the_wrong_type_is_a_protocol_error() -> None:
    pair = Pair()
    pair.ready()
    ping = pair.parent.request(RequestType.PING)
    pair.send(ping)
    body = codec.encode(WorkerResponse(ping.request_id, RequestType.WRITE_CHECKPOINT, True))[4:]
    with pytest.raises(ProtocolError, match="says it answers write_checkpoint"):
        pair.parent.receive(body)


def test_version_mismatch_is_named_on_either_side() -> None:
    other = msgspec.structs.replace(INIT, protocol_version=PROTOCOL_VERSION + 1)
    body = codec.encode(WorkerRequest(HANDSHAKE_ID, RequestType.INIT, other))[4:]
    with pytest.raises(ProtocolVersionMismatch):
        WorkerSession().receive(body)
    parent = ParentSession()
    parent.handshake(INIT)
    ready = ReadyPayload(PROTOCOL_VERSION + 1, 1)
    body = codec.encode(WorkerResponse(HANDSHAKE_ID, RequestType.INIT, True, payload=ready))[4:]
    with pytest.raises(ProtocolVersionMismatch):
        parent.receive(body)


def test_worker_routes_and_refuses_out_of_order_requests() -> None:
    worker = WorkerSession()
    ping = codec.encode(WorkerRequest(1, RequestType.PING))[4:]
    with pytest.raises(ProtocolError, match="init request first"):
        worker.receive(ping)

    pair = Pair()
    pair.ready()
    with pytest.raises(ProtocolError, match="use handshake"):
        pair.parent.request(RequestType.INIT)
    second_init = codec.encode(WorkerRequest(9, RequestType.INIT, INIT))[4:]
    route, _, refusal = pair.worker.receive(second_init)
    assert route is Route.REFUSED and "handshake is done" in str(refusal)
    no_payload = codec.encode(WorkerRequest(10, RequestType.CANCEL))[4:]
    route, _, refusal = pair.worker.receive(no_payload)
    assert route is Route.REFUSED and "without its payload" in str(refusal)
    kinds = {
        RequestType.PING: Route.IMMEDIATE,
        RequestType.CANCEL: Route.IMMEDIATE,
        RequestType.WRITE_CHECKPOINT: Route.QUEUED,
        RequestType.TERMINATE_PROCESS: Route.QUEUED,
    }
    for kind, route in kinds.items():
        payload = CancelPayload(1) if kind is RequestType.CANCEL else None
        [(routed, _, _)] = pair.send(pair.parent.request(kind, payload))
        assert routed is route
    assert pair.parent.state is ParentSessionState.TERMINATING
    assert pair.worker.state is WorkerSessionState.TERMINATING
    with pytest.raises(ProtocolError, match="terminating"):
        pair.parent.request(RequestType.PING)
    late = codec.encode(WorkerRequest(99, RequestType.PING))[4:]
    with pytest.raises(ProtocolError, match="after TERMINATE"):
        pair.worker.receive(late)


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_split_and_coalesced_bytes_give_the_same_exchange(cuts: list[int]) -> None:
    """Three requests in one byte string, cut anywhere: the worker sees the same three."""
    parent, worker, decoder = ParentSession(), WorkerSession(), FrameDecoder()
    stream = codec.encode(parent.handshake(INIT))
    parent.state = ParentSessionState.READY  # (the answer to INIT is another test's business)
    stream += codec.encode(parent.request(RequestType.PING))
    stream += codec.encode(parent.request(RequestType.TERMINATE_PROCESS))
    points = sorted({min(c, len(stream)) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    received = [worker.receive(body) for piece in pieces for body in decoder.feed(piece)]
    assert [(route, r.request_type) for route, r, _ in received] == [
        (Route.HANDSHAKE, RequestType.INIT),
        (Route.IMMEDIATE, RequestType.PING),
        (Route.QUEUED, RequestType.TERMINATE_PROCESS),
    ]


def test_write_gate_cancel_before_commit_wins_and_after_commit_loses() -> None:
    gate = WriteGate()
    gate.admit(1)
    gate.admit(2)
    assert gate.cancel(1)
    with pytest.raises(WriteCancelled, match="before it started"):
        gate.check(1)
    with pytest.raises(WriteCancelled, match="before its commit"):
        gate.begin_commit(1)
    gate.check(2)
    gate.begin_commit(2)
    assert not gate.cancel(2)  # the commit had begun: the write completes
    gate.finish(1)
    gate.finish(2)
    assert not gate.cancel(1)  # answered already: nothing to cancel


def _commit(
    gate: WriteGate, request_id: int, start: threading.Barrier, out: dict[str, bool]
) -> None:
    start.wait()
    try:
        gate.begin_commit(request_id)
        out["committed"] = True
    except WriteCancelled:
        out["committed"] = False


def test_write_gate_decides_a_race_exactly_once() -> None:
    """A CANCEL and the commit racing from two threads: exactly one of them wins, always."""
    for request_id in range(200):
        gate = WriteGate()
        gate.admit(request_id)
        start = threading.Barrier(2)
        outcome: dict[str, bool] = {}
        thread = threading.Thread(target=_commit, args=(gate, request_id, start, outcome))
        thread.start()
        start.wait()
        outcome["cancelled"] = gate.cancel(request_id)
        thread.join()
        assert outcome["committed"] != outcome["cancelled"], outcome


def staged_write(plan_id: int | None, step: int, skeleton: Node, arena: str = "/a") -> WritePayload:
    """A write of ``{"w": <tensor in the arena>, "step": step}`` laid out by plan ``plan_id``."""
    leaves = [TensorInArena("float32", [4], 0, 16), PlainValue(step)]
    return WritePayload(
        "/ckpt", StateDictPayload(skeleton, leaves, ArenaRef(arena, 64), plan_id=plan_id)
    )


def test_a_repeated_layout_crosses_as_its_plan_and_its_plain_values() -> None:
    pair = Pair()
    pair.ready()
    skeleton = DictNode(["w", "step"], [LeafNode(0), LeafNode(1)])
    sizes, sent_as, received = [], [], []
    writes = [
        staged_write(7, 1, skeleton),  # whole: the first of plan 7
        staged_write(7, 2, skeleton, "/b"),  # repeated, in another arena
        staged_write(None, 3, skeleton),  # no plan: whole, and plan 7 is still the last
        staged_write(7, 4, skeleton),  # repeated
        staged_write(8, 5, DictNode(["w", "step"], [LeafNode(0), LeafNode(1)])),  # whole
        staged_write(8, 6, skeleton),  # a plan's id with another skeleton: whole
    ]
    for payload in writes:
        request = pair.parent.request(RequestType.WRITE_CHECKPOINT, payload)
        sizes.append(len(codec.encode(request)))
        assert isinstance(request.payload, WritePayload)
        sent_as.append(type(request.payload.state_dict))
        [(route, got, _)] = pair.send(request)
        assert route is Route.QUEUED
        received.append(got.payload)
        pair.answer(WorkerResponse(got.request_id, got.request_type, True))
    whole, repeated = StateDictPayload, RepeatedStateDict
    assert sent_as == [whole, repeated, whole, repeated, whole, whole]
    assert sizes[1] < sizes[0] and sizes[3] < sizes[0]
    # The worker gets what the trainer wrote, whole.
    assert received == writes


def test_a_repeat_the_worker_cannot_expand_breaks_the_channel() -> None:
    pair = Pair()
    pair.ready()
    skeleton = DictNode(["w", "step"], [LeafNode(0), LeafNode(1)])
    unknown = WritePayload("/ckpt", RepeatedStateDict(3, [PlainValue(1)], ArenaRef("/a", 64)))
    with pytest.raises(ProtocolError, match="repeats plan 3, but the last state dict"):
        pair.send(WorkerRequest(1, RequestType.WRITE_CHECKPOINT, unknown))
    pair = Pair()
    pair.ready()
    request = pair.parent.request(RequestType.WRITE_CHECKPOINT, staged_write(3, 1, skeleton))
    pair.send(request)
    short = WritePayload("/ckpt", RepeatedStateDict(3, [], ArenaRef("/a", 64)))
    with pytest.raises(ProtocolError, match="with 0 leaves outside the arena; the plan has 1"):
        pair.send(WorkerRequest(2, RequestType.WRITE_CHECKPOINT, short))


def test_a_write_that_could_not_be_sent_leaves_the_next_one_whole() -> None:
    pair = Pair()
    pair.ready()
    skeleton = DictNode(["w", "step"], [LeafNode(0), LeafNode(1)])
    lost = pair.parent.request(RequestType.WRITE_CHECKPOINT, staged_write(5, 1, skeleton))
    pair.parent.unsent()  # it never reached the worker
    pair.parent.abandon(lost.request_id)
    again = pair.parent.request(RequestType.WRITE_CHECKPOINT, staged_write(5, 2, skeleton))
    assert isinstance(again.payload, WritePayload)
    assert isinstance(again.payload.state_dict, StateDictPayload)
    [(_, got, _)] = pair.send(again)
    assert got.payload == staged_write(5, 2, skeleton)
