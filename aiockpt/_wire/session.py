"""The rules of one trainer <-> worker channel, without IO (no asyncio, no sockets, no torch).

Theory of operation
-------------------
``aiockpt._wire.protocol`` says what a frame and a message are; this module says which message
may come when. Each side holds one session; its IO glue (``aiockpt._trainer.checkpoint_process``
in the trainer, ``aiockpt._worker.serve`` in the worker) hands it every frame body it reads,
sends only the messages the session made or allowed, and so cannot break these rules by
accident. The tests pair two sessions in memory, as h11's do, with no process in between.

Trainer side, ``ParentSession``::

    HANDSHAKING --INIT answered, success--> READY --TERMINATE sent--> TERMINATING
         |--INIT answered, failure--> FAILED

- The first request is INIT, with the fixed id 0 (so that a worker which cannot decode it can
  still answer it); nothing else is sent before the worker has answered it with success.
- Every later request gets the next id; each id is answered exactly once.
- The first response must answer INIT; its protocol version is checked before the rest of it
  is decoded, so a version mismatch is reported as such.
- A response to an id never sent, or one answered already, is a ``ProtocolError`` (the worker
  is confused: nothing it says can be trusted). One to an id the trainer stopped waiting for
  (``abandon``: a timed-out ping, a cancelled write's CANCEL) is dropped.
- A progress report (a response whose payload is ``ProgressPayload``) does not answer: it is
  allowed only for a WRITE_CHECKPOINT that asked for reports and is not answered yet, and its
  byte counts never go down.
- A STAGED request names a write sent while staging (``WritePayload.staged_bytes``) and not
  yet answered; its byte counts never go down, and none follows the one that says
  ``complete``.
- A write whose state dict has the plan (``StateDictPayload.plan_id``) of the last one sent
  whole is sent as a ``RepeatedStateDict``: that plan's id and the leaves outside the arena
  only. The rule is the session's, on both sides, by the order of requests on the channel, so
  it holds whatever later becomes of the writes (refused, cancelled, failed). A request that
  could not be sent (``unsent``) leaves the next write whole.

Worker side, ``WorkerSession``::

    AWAITING_INIT --INIT--> SERVING --TERMINATE--> TERMINATING

- The first request must be INIT (a request of another protocol version is a
  ``ProtocolVersionMismatch`` even when it no longer decodes); any request after TERMINATE is
  a ``ProtocolError``.
- A well-formed request the worker cannot serve (a second INIT; a CANCEL, MAP_ARENA or
  RELEASE_ARENA without its payload) is ``Route.REFUSED``: answered with a failure naming
  why, and the worker serves on.
- A write's ``RepeatedStateDict`` is expanded on receipt into the ``StateDictPayload`` it
  stands for (the last one received whole, with its other leaves replaced); one that names
  another plan, or whose leaves do not fit it, is a ``ProtocolError``.
- Each request is routed: PING, CANCEL, MAP_ARENA, RELEASE_ARENA and STAGED are answered at
  once, even while a write runs (``Route.IMMEDIATE``); WRITE_CHECKPOINT and TERMINATE wait
  their turn behind earlier writes (``Route.QUEUED``).
- ``respond`` accepts an answer only to a request received and not yet answered;
  ``progress`` makes a report only for a write that asked for them and is not answered yet.

Cancel before commit, ``WriteGate``: a CANCEL (on the worker's loop) races the write thread.
Whichever takes the gate's lock first decides: a write whose commit began completes and
answers with success; a write cancelled before that raises ``WriteCancelled`` at its next
check and answers as cancelled. The gate also tells a write sent while staging how far the
staging is (``wait_staged``): its writer writes each region once it is staged, and a CANCEL
wakes it.
"""

from __future__ import annotations

import enum
import math
import threading
from typing import NamedTuple

import msgspec

from aiockpt._wire.protocol import (
    ArenaPayload,
    CancelPayload,
    InitPayload,
    MessageCodec,
    ProgressPayload,
    RepeatedStateDict,
    RequestType,
    StagedPayload,
    StateDictPayload,
    TensorInArena,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
)
from aiockpt.errors import ProtocolError

__all__ = [
    "HANDSHAKE_ID",
    "LastLayout",
    "ParentSession",
    "ParentSessionState",
    "Received",
    "Route",
    "WorkerSession",
    "WorkerSessionState",
    "WriteCancelled",
    "WriteGate",
]

#: the id of INIT, fixed so that a worker which cannot decode the request can answer it
HANDSHAKE_ID = 0

#: requests the worker answers at once, even while a write runs
_IMMEDIATE = frozenset(
    {
        RequestType.PING,
        RequestType.CANCEL,
        RequestType.MAP_ARENA,
        RequestType.RELEASE_ARENA,
        RequestType.STAGED,
    }
)
#: the payload a request must carry to be served
_PAYLOAD_OF: dict[RequestType, type] = {
    RequestType.CANCEL: CancelPayload,
    RequestType.MAP_ARENA: ArenaPayload,
    RequestType.RELEASE_ARENA: ArenaPayload,
    RequestType.STAGED: StagedPayload,
}


class ParentSessionState(enum.Enum):
    HANDSHAKING = "handshaking"
    READY = "ready"
    FAILED = "failed"
    TERMINATING = "terminating"


class WorkerSessionState(enum.Enum):
    AWAITING_INIT = "awaiting init"
    SERVING = "serving"
    TERMINATING = "terminating"


class Route(enum.Enum):
    """What the worker does with a request it received."""

    #: the handshake: run the init functions, then answer
    HANDSHAKE = "handshake"
    #: answer now, whatever else is in progress
    IMMEDIATE = "immediate"
    #: serve after the writes received before it, in arrival order
    QUEUED = "queued"
    #: answer with a failure (``Received.refusal`` says why) and serve on
    REFUSED = "refused"


class Received(NamedTuple):
    """A request the worker received, and how to serve it."""

    route: Route
    request: WorkerRequest
    #: why a ``Route.REFUSED`` request is refused
    refusal: str | None = None


class LastLayout:
    """The state dict of the last write sent (or received) whole, and where its leaves outside
    the arena are: what a ``RepeatedStateDict`` stands for (both sides hold one)."""

    def __init__(self) -> None:
        self._whole: StateDictPayload | None = None
        self._others: list[int] = []

    def forget(self) -> None:
        self._whole = None

    def shorten(self, payload: WritePayload) -> WritePayload:
        """``payload`` with a ``RepeatedStateDict`` when its plan is the last one's."""
        state = payload.state_dict
        if type(state) is not StateDictPayload or state.plan_id is None:
            return payload
        whole = self._whole
        if whole is None or whole.plan_id != state.plan_id or whole.skeleton is not state.skeleton:
            self._remember(state)
            return payload
        others = [state.leaves[index] for index in self._others]
        return msgspec.structs.replace(
            payload, state_dict=RepeatedStateDict(state.plan_id, others, state.arena)
        )

    def expand(self, payload: WritePayload, request_id: int) -> WritePayload:
        """``payload`` with its ``RepeatedStateDict`` expanded; remembers a whole one.
        Raises ``ProtocolError`` for one that does not repeat the last."""
        state = payload.state_dict
        if type(state) is StateDictPayload:
            if state.plan_id is not None:
                self._remember(state)
            return payload
        assert isinstance(state, RepeatedStateDict)
        whole = self._whole
        if whole is None or whole.plan_id != state.plan_id:
            last = None if whole is None else whole.plan_id
            raise ProtocolError(
                f"write {request_id} repeats plan {state.plan_id}, but the last state dict "
                f"received whole was of plan {last}"
            )
        if len(state.others) != len(self._others):
            raise ProtocolError(
                f"write {request_id} repeats plan {state.plan_id} with {len(state.others)} "
                f"leaves outside the arena; the plan has {len(self._others)}"
            )
        leaves = list(whole.leaves)
        for index, leaf in zip(self._others, state.others, strict=True):
            leaves[index] = leaf
        expanded = StateDictPayload(whole.skeleton, leaves, state.arena, state.plan_id)
        return msgspec.structs.replace(payload, state_dict=expanded)

    def _remember(self, state: StateDictPayload) -> None:
        self._whole = state
        self._others = [i for i, leaf in enumerate(state.leaves) if type(leaf) is not TensorInArena]


class ParentSession:
    """The trainer's side of one channel (see the module docstring for the rules)."""

    def __init__(self, codec: MessageCodec | None = None) -> None:
        self._codec = codec if codec is not None else MessageCodec()
        self.state = ParentSessionState.HANDSHAKING
        self._next_id = HANDSHAKE_ID + 1
        self._handshake_sent = False
        self._handshake_answered = False
        #: ids sent and not answered, by request type
        self._outstanding: dict[int, RequestType] = {}
        #: ids sent whose answers nobody waits for any more
        self._abandoned: set[int] = set()
        #: writes that asked for progress reports -> the last count reported
        self._reported: dict[int, int] = {}
        #: writes sent while staging -> the bytes said to be staged so far
        self._staging: dict[int, int] = {}
        #: the state dict of the last write sent whole, as both sides know it
        self._layout = LastLayout()

    def handshake(self, init: InitPayload) -> WorkerRequest:
        """The INIT request. Raises ``ProtocolError`` if it was made before."""
        if self._handshake_sent:
            raise ProtocolError("the handshake was sent already")
        self._handshake_sent = True
        self._outstanding[HANDSHAKE_ID] = RequestType.INIT
        return WorkerRequest(HANDSHAKE_ID, RequestType.INIT, init)

    def request(self, kind: RequestType, payload: object = None) -> WorkerRequest:
        """The next request of ``kind``. Raises ``ProtocolError`` before the handshake
        succeeded, after it failed, after TERMINATE, or for a second INIT."""
        if kind is RequestType.INIT:
            raise ProtocolError("INIT is the handshake; use handshake()")
        if self.state is not ParentSessionState.READY:
            raise ProtocolError(f"cannot send {kind.value} while the session is {self.state.value}")
        if isinstance(payload, StagedPayload):
            self._check_staged(payload)
        request_id = self._next_id
        self._next_id += 1
        self._outstanding[request_id] = kind
        if _wants_progress(kind, payload):
            self._reported[request_id] = 0
        if isinstance(payload, WritePayload):
            if payload.staged_bytes is not None:
                self._staging[request_id] = payload.staged_bytes
            payload = self._layout.shorten(payload)
        if kind is RequestType.TERMINATE_PROCESS:
            self.state = ParentSessionState.TERMINATING
        return WorkerRequest(request_id, kind, payload)  # type: ignore[arg-type]

    def _check_staged(self, report: StagedPayload) -> None:
        last = self._staging.get(report.request_id)
        if last is None or report.request_id not in self._outstanding:
            raise ProtocolError(
                f"STAGED for request {report.request_id}, which is no write sent while staging "
                "and awaiting its answer (or its staging was complete)"
            )
        if report.nbytes < last:
            raise ProtocolError(
                f"staging of request {report.request_id} cannot go back from {last} to "
                f"{report.nbytes} bytes"
            )
        if report.complete:
            del self._staging[report.request_id]
        else:
            self._staging[report.request_id] = report.nbytes

    def unsent(self) -> None:
        """The request made last could not be sent whole (encoding it failed, or the send
        was interrupted): the next write's state dict is sent whole, whatever the worker
        received of this one."""
        self._layout.forget()

    def abandon(self, request_id: int) -> None:
        """Stop waiting for ``request_id``'s answer: it is dropped when it comes."""
        if request_id in self._outstanding:
            self._abandoned.add(request_id)

    def receive(self, body: bytes) -> WorkerResponse | None:
        """Decode one response frame body and check it against the rules; None for the
        answer to an abandoned request. Raises ``ProtocolError`` (``ProtocolVersionMismatch``
        for a worker of another version) when the worker broke them."""
        if not self._handshake_answered:
            self._codec.check_handshake_response(body)
        response = self._codec.decode_response(body)
        if isinstance(response.payload, ProgressPayload):
            return self._progress(response, response.payload)
        self._reported.pop(response.request_id, None)
        self._staging.pop(response.request_id, None)
        kind = self._outstanding.pop(response.request_id, None)
        if kind is None:
            raise ProtocolError(
                f"response to request {response.request_id}, which was never sent or is "
                "answered already"
            )
        if not self._handshake_answered:
            if kind is not RequestType.INIT:
                raise ProtocolError(f"the first response answers {kind.value}, not INIT")
            self._handshake_answered = True
            self.state = ParentSessionState.READY if response.success else ParentSessionState.FAILED
        elif response.request_type is not kind:
            raise ProtocolError(
                f"response to request {response.request_id} ({kind.value}) says it answers "
                f"{response.request_type.value}"
            )
        if response.request_id in self._abandoned:
            self._abandoned.discard(response.request_id)
            return None
        return response

    def _progress(self, response: WorkerResponse, report: ProgressPayload) -> WorkerResponse | None:
        """A progress report: checked, the request left outstanding."""
        last = self._reported.get(response.request_id)
        if last is None or response.request_type is not RequestType.WRITE_CHECKPOINT:
            raise ProtocolError(
                f"progress report for request {response.request_id}, which is no write "
                "awaiting its answer that asked for reports"
            )
        if report.bytes_written < last:
            raise ProtocolError(
                f"progress of request {response.request_id} went back from {last} to "
                f"{report.bytes_written} bytes"
            )
        self._reported[response.request_id] = report.bytes_written
        return None if response.request_id in self._abandoned else response

    @property
    def outstanding(self) -> frozenset[int]:
        """Ids sent and not answered yet (abandoned ones included)."""
        return frozenset(self._outstanding)


def _wants_progress(kind: RequestType, payload: object) -> bool:
    return (
        kind is RequestType.WRITE_CHECKPOINT
        and isinstance(payload, WritePayload)
        and payload.progress_bytes is not None
    )


class WorkerSession:
    """The worker's side of one channel (see the module docstring for the rules)."""

    def __init__(self, codec: MessageCodec | None = None) -> None:
        self._codec = codec if codec is not None else MessageCodec()
        self.state = WorkerSessionState.AWAITING_INIT
        self._unanswered: set[int] = set()
        #: writes that asked for progress reports and are not answered -> last count made
        self._reporting: dict[int, int] = {}
        #: the state dict of the last write received whole
        self._layout = LastLayout()

    def receive(self, body: bytes) -> Received:
        """Decode one request frame body, check it, and say how to serve it. Raises
        ``ProtocolError`` (``ProtocolVersionMismatch`` for a trainer of another version)
        when the trainer broke the rules so that the channel cannot go on; answer it with
        ``HANDSHAKE_ID`` if it came first."""
        if self.state is WorkerSessionState.AWAITING_INIT:
            self._codec.check_handshake_request(body)
        request = self._codec.decode_request(body)
        kind = request.request_type
        refusal = None
        if self.state is WorkerSessionState.AWAITING_INIT:
            if kind is not RequestType.INIT or not isinstance(request.payload, InitPayload):
                raise ProtocolError(f"expected an init request first, got {kind.value}")
            self.state = WorkerSessionState.SERVING
            route = Route.HANDSHAKE
        elif self.state is WorkerSessionState.TERMINATING:
            raise ProtocolError(f"{kind.value} request after TERMINATE")
        elif request.request_id in self._unanswered:
            raise ProtocolError(f"request id {request.request_id} is in use")
        elif kind is RequestType.INIT:
            route, refusal = Route.REFUSED, "unexpected init request: the handshake is done"
        elif not isinstance(request.payload, _PAYLOAD_OF.get(kind, object)):
            route, refusal = Route.REFUSED, f"{kind.value} request without its payload"
        else:
            route = Route.IMMEDIATE if kind in _IMMEDIATE else Route.QUEUED
            if kind is RequestType.TERMINATE_PROCESS:
                self.state = WorkerSessionState.TERMINATING
        self._unanswered.add(request.request_id)
        if isinstance(request.payload, WritePayload):
            request = msgspec.structs.replace(
                request, payload=self._layout.expand(request.payload, request.request_id)
            )
        if route is Route.QUEUED and _wants_progress(kind, request.payload):
            self._reporting[request.request_id] = 0
        return Received(route, request, refusal)

    def respond(self, response: WorkerResponse) -> WorkerResponse:
        """Check that ``response`` answers a request received and not answered yet; return
        it, to send. Raises ``ProtocolError`` otherwise (a bug on this side)."""
        if response.request_id not in self._unanswered:
            raise ProtocolError(
                f"answer to request {response.request_id}, which is not awaiting one"
            )
        self._unanswered.discard(response.request_id)
        self._reporting.pop(response.request_id, None)
        return response

    def progress(self, request_id: int, bytes_written: int) -> WorkerResponse:
        """A progress report on write ``request_id``, to send. Raises ``ProtocolError`` (a
        bug on this side) for a request that did not ask for reports or is answered, or a
        count below the last one reported."""
        last = self._reporting.get(request_id)
        if last is None:
            raise ProtocolError(
                f"no progress report for request {request_id}: not a write awaiting its "
                "answer that asked for reports"
            )
        if bytes_written < last:
            raise ProtocolError(
                f"no progress report of {bytes_written} bytes for request {request_id}: "
                f"{last} reported already"
            )
        self._reporting[request_id] = bytes_written
        return WorkerResponse(
            request_id,
            RequestType.WRITE_CHECKPOINT,
            True,
            payload=ProgressPayload(bytes_written),
        )


class WriteCancelled(Exception):
    """A CANCEL request arrived before the write's commit began."""


class WriteGate:
    """Which writes a CANCEL may still stop, and how far the staging of a write sent while
    staging is. Thread-safe: the worker's loop cancels and hears of staging, its write
    thread waits and commits."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._outstanding: set[int] = set()
        self._cancelled: set[int] = set()
        self._committing: set[int] = set()
        #: writes sent while staging -> arena bytes staged so far (inf: all of them)
        self._staged: dict[int, float] = {}

    def admit(self, request_id: int, staged_bytes: int | None = None) -> None:
        """A write was received (and queued); ``staged_bytes`` as its ``WritePayload`` says."""
        with self._changed:
            self._outstanding.add(request_id)
            if staged_bytes is not None:
                self._staged[request_id] = staged_bytes

    def staged(self, report: StagedPayload) -> None:
        """More of a write's bytes are staged (a STAGED request). One for a write answered
        already (it failed early) changes nothing."""
        with self._changed:
            if report.request_id in self._staged:
                self._staged[report.request_id] = math.inf if report.complete else report.nbytes
                self._changed.notify_all()

    def wait_staged(self, request_id: int, end: int | None, timeout_s: float) -> float:
        """Until the arena bytes of ``request_id`` below ``end`` (None: all) are staged;
        return how many are by then (``math.inf``: all), so that the write goes on up to
        there without waiting again. Raises ``WriteCancelled`` if a CANCEL comes first,
        ``TimeoutError`` when staging makes no such progress within ``timeout_s``."""
        needed = math.inf if end is None else end

        def ready() -> bool:
            staged = self._staged.get(request_id, math.inf)
            return staged >= needed or request_id in self._cancelled

        with self._changed:
            if not self._changed.wait_for(ready, timeout_s):
                raise TimeoutError(
                    f"the trainer staged {self._staged.get(request_id)} bytes of write "
                    f"{request_id}, and no more than that within {timeout_s} s"
                )
            if request_id in self._cancelled:
                raise WriteCancelled("cancelled while staging")
            return self._staged.get(request_id, math.inf)

    def cancel(self, request_id: int) -> bool:
        """Ask to abandon a write; True if it will be (its commit had not begun)."""
        with self._changed:
            if request_id in self._outstanding and request_id not in self._committing:
                self._cancelled.add(request_id)
                self._changed.notify_all()  # a write waiting for its staging gives up
                return True
            return False

    def check(self, request_id: int) -> None:
        """Raise ``WriteCancelled`` if the write was cancelled (call it before starting)."""
        with self._changed:
            if request_id in self._cancelled:
                raise WriteCancelled("cancelled before it started")

    def begin_commit(self, request_id: int) -> None:
        """The write's point of no return: raises ``WriteCancelled`` if a CANCEL came first,
        and makes later CANCELs no-ops."""
        with self._changed:
            if request_id in self._cancelled:
                raise WriteCancelled("cancelled before its commit")
            self._committing.add(request_id)

    def finish(self, request_id: int) -> None:
        """The write was answered: forget it."""
        with self._changed:
            self._outstanding.discard(request_id)
            self._cancelled.discard(request_id)
            self._committing.discard(request_id)
            self._staged.pop(request_id, None)
