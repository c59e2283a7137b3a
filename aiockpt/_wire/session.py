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

Worker side, ``WorkerSession``::

    AWAITING_INIT --INIT--> SERVING --TERMINATE--> TERMINATING

- The first request must be INIT (a request of another protocol version is a
  ``ProtocolVersionMismatch`` even when it no longer decodes); any request after TERMINATE is
  a ``ProtocolError``.
- A well-formed request the worker cannot serve (a second INIT; a CANCEL, MAP_ARENA or
  RELEASE_ARENA without its payload) is ``Route.REFUSED``: answered with a failure naming
  why, and the worker serves on.
- Each request is routed: PING, CANCEL, MAP_ARENA and RELEASE_ARENA are answered at once,
  even while a write runs (``Route.IMMEDIATE``); WRITE_CHECKPOINT and TERMINATE wait their turn
  behind earlier writes (``Route.QUEUED``).
- ``respond`` accepts an answer only to a request received and not yet answered;
  ``progress`` makes a report only for a write that asked for them and is not answered yet.

Cancel before commit, ``WriteGate``: a CANCEL (on the worker's loop) races the write thread.
Whichever takes the gate's lock first decides: a write whose commit began completes and
answers with success; a write cancelled before that raises ``WriteCancelled`` at its next
check and answers as cancelled.
"""

from __future__ import annotations

import enum
import threading
from typing import NamedTuple

from aiockpt._wire.protocol import (
    ArenaPayload,
    CancelPayload,
    InitPayload,
    MessageCodec,
    ProgressPayload,
    RequestType,
    WorkerRequest,
    WorkerResponse,
    WritePayload,
)
from aiockpt.errors import ProtocolError

__all__ = [
    "HANDSHAKE_ID",
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
    }
)
#: the payload a request must carry to be served
_PAYLOAD_OF: dict[RequestType, type] = {
    RequestType.CANCEL: CancelPayload,
    RequestType.MAP_ARENA: ArenaPayload,
    RequestType.RELEASE_ARENA: ArenaPayload,
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
        request_id = self._next_id
        self._next_id += 1
        self._outstanding[request_id] = kind
        if _wants_progress(kind, payload):
            self._reported[request_id] = 0
        if kind is RequestType.TERMINATE_PROCESS:
            self.state = ParentSessionState.TERMINATING
        return WorkerRequest(request_id, kind, payload)  # type: ignore[arg-type]

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
    """Which writes a CANCEL may still stop. Thread-safe: the worker's loop cancels, its
    write thread commits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outstanding: set[int] = set()
        self._cancelled: set[int] = set()
        self._committing: set[int] = set()

    def admit(self, request_id: int) -> None:
        """A write was received (and queued)."""
        with self._lock:
            self._outstanding.add(request_id)

    def cancel(self, request_id: int) -> bool:
        """Ask to abandon a write; True if it will be (its commit had not begun)."""
        with self._lock:
            if request_id in self._outstanding and request_id not in self._committing:
                self._cancelled.add(request_id)
                return True
            return False

    def check(self, request_id: int) -> None:
        """Raise ``WriteCancelled`` if the write was cancelled (call it before starting)."""
        with self._lock:
            if request_id in self._cancelled:
                raise WriteCancelled("cancelled before it started")

    def begin_commit(self, request_id: int) -> None:
        """The write's point of no return: raises ``WriteCancelled`` if a CANCEL came first,
        and makes later CANCELs no-ops."""
        with self._lock:
            if request_id in self._cancelled:
                raise WriteCancelled("cancelled before its commit")
            self._committing.add(request_id)

    def finish(self, request_id: int) -> None:
        """The write was answered: forget it."""
        with self._lock:
            self._outstanding.discard(request_id)
            self._cancelled.discard(request_id)
            self._committing.discard(request_id)
