"""Frames and messages between a trainer and its checkpoint worker. Sans-IO: no sockets, no
asyncio, no torch; the parent (``aiockpt._trainer.checkpoint_process``) and the worker
(``aiockpt._worker``) wrap it in streams.

Theory of operation
-------------------
The channel is a byte stream (a socketpair). Each message is one *frame*: a 4-byte big-endian
length, then that many bytes of msgpack. ``FrameDecoder`` accepts bytes in whatever chunks the
stream delivers, split or coalesced, and yields whole frame bodies; a length above the
configured maximum is a ``ProtocolError`` at once, before any of the body is buffered.

The parent sends ``WorkerRequest``s and the worker answers each with one ``WorkerResponse``
carrying the same ``request_id``, so several requests may be in flight at once (a PING is
answered while a write runs). A write that asks for them (``WritePayload.progress_bytes``)
may also get progress reports before its answer: ``WorkerResponse``s whose payload is a
``ProgressPayload``, which report and do not answer.

The first exchange is the handshake: an INIT request that carries the protocol version, the
init functions (as import references) and their arguments; the worker answers with READY once
the init functions have run. A version mismatch is detected from a
probe that reads only the version, so it is reported as such even when the rest of the message
no longer decodes.

Tensor bytes do not belong in frames: a WRITE_CHECKPOINT request describes the state dict as a
skeleton plus leaves (``aiockpt._format.tree``), and tensor leaves point into a shared-memory
arena by offset (``TensorInArena``); a request whose tensors are all empty names no arena. The
worker still accepts ``TensorInline`` (bytes in the frame), which this version never sends:
``CheckpointProcess.write`` stages through an arena too.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from typing import Any, TypeAlias

import msgspec

from aiockpt._format.tree import Node
from aiockpt.errors import ProtocolError, ProtocolVersionMismatch

__all__ = [
    "CANCELLED_ERROR_TYPE",
    "DEFAULT_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "ArenaPayload",
    "ArenaRef",
    "BigIntValue",
    "CancelPayload",
    "CommitOptions",
    "FrameDecoder",
    "GcOptions",
    "GroupInfo",
    "InitPayload",
    "Leaf",
    "MessageCodec",
    "PickledObject",
    "PlainValue",
    "ProgressPayload",
    "RankInfo",
    "ReadyPayload",
    "RepeatedStateDict",
    "RequestType",
    "ShardSpec",
    "StagedPayload",
    "StateDictPayload",
    "TensorInArena",
    "TensorInline",
    "WorkerRequest",
    "WorkerResponse",
    "WritePayload",
    "WriteResultPayload",
    "check_version",
    "encode_frame",
]

#: 2: int leaves beyond 64 bits travel as ``BigIntValue``; 3: progress reports of writes;
#: 4: writes sent while staging (``WritePayload.staged_bytes``, STAGED requests); 5: a
#: repeated layout travels as ``RepeatedStateDict``
PROTOCOL_VERSION = 5
#: frames carry metadata only (tensor bytes go through shared memory), so 64 MiB is generous
DEFAULT_MAX_FRAME_SIZE = 64 * 1024 * 1024

_LENGTH = struct.Struct(">I")
_LENGTH_MAX = 2**32 - 1


class RequestType(enum.Enum):
    INIT = "init"
    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "terminate_process"
    #: map a new arena (the parent's memfd, by its /proc path) before the parent copies into it
    MAP_ARENA = "map_arena"
    #: drop the worker's mapping of an arena the parent no longer uses
    RELEASE_ARENA = "release_arena"
    #: abandon a write unless its commit has begun; the write then answers as cancelled
    CANCEL = "cancel"
    #: more of a write's arena bytes are staged (a write sent while staging, see WritePayload)
    STAGED = "staged"


#: ``WorkerResponse.error_type`` of a write abandoned because of a CANCEL request
CANCELLED_ERROR_TYPE = "cancelled"


class RankInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a checkpoint worker's trainer stands in the job (torch's ``RankInfo``)."""

    global_rank: int = 0
    global_world_size: int = 1


class GcOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Garbage-collector controls in the worker, as torch's process executor offers them.

    A worker holds few cyclic objects, so a full collection mostly walks torch's module graph;
    freezing that graph after the first write keeps later collections cheap.
    """

    disable_automatic: bool = False
    collect_after_write: bool = False
    freeze_after_first_write: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GcOptions:
        """torch's switches: ``DCP_DISABLE_AUTOMATIC_GC=1`` turns automatic collection off
        and then collects after every write (freezing after the first) unless
        ``DCP_DISABLE_MANUAL_GC=1``."""
        automatic_off = environ.get("DCP_DISABLE_AUTOMATIC_GC", "0") == "1"
        manual = automatic_off and environ.get("DCP_DISABLE_MANUAL_GC", "0") != "1"
        return cls(automatic_off, collect_after_write=manual, freeze_after_first_write=manual)


class GroupInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a checkpoint worker reaches the other ranks' workers (torch's
    ``_ProcessGroupInitInfo``): the store at ``addr:port``, under ``prefix`` + ``session``."""

    addr: str
    port: int
    #: "AsyncCheckpointProcess/" when the workers share the trainers' store (the
    #: ``DCP_USE_PREFIX_STORE`` mode), "" when the store is the checkpointer's own
    prefix: str
    #: unique per Checkpointer group, so that no two groups' keys ever meet
    session: str
    rank: int
    world_size: int
    local_rank: int
    #: how long a rank waits for another at any coordinated step
    timeout_s: float
    #: form the workers' gloo process group during start-up under this generation; None for
    #: a worker that replaces a dead one: the group is re-formed after the next save instead
    pg_generation: int | None = 0


# --- state-dict leaves -------------------------------------------------------------------------
# The per-tensor structs are untracked by the garbage collector (gc=False: they hold only
# numbers, strings and lists of numbers, so no cycle can pass through them). A request of
# 20,000 tensors would otherwise add 40,000 tracked objects in the worker and set off passes.


class ShardSpec(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Where a rank's local piece of a sharded tensor (a DTensor's ``to_local()``) lies in the
    whole: the whole tensor's shape and the piece's offset along every dimension."""

    global_shape: list[int]
    offsets: list[int]


class TensorInArena(msgspec.Struct, frozen=True, tag="arena", array_like=True, gc=False):
    """A contiguous tensor whose bytes lie at ``offset`` in the request's arena; ``shard``
    when it is this rank's piece of a sharded tensor."""

    dtype: str
    shape: list[int]
    offset: int
    nbytes: int
    shard: ShardSpec | None = None


class TensorInline(msgspec.Struct, frozen=True, tag="inline", array_like=True):
    """A contiguous tensor whose bytes travel in the frame (small ad-hoc writes only)."""

    dtype: str
    shape: list[int]
    data: bytes


class PlainValue(msgspec.Struct, frozen=True, tag="value", array_like=True):
    """A non-tensor leaf: int, float, str, bool, None or bytes (msgpack keeps them apart)."""

    value: Any


class BigIntValue(msgspec.Struct, frozen=True, tag="bigint", array_like=True):
    """An int leaf beyond msgpack's range (below -2**63 or above 2**64 - 1), as decimal text."""

    value: str


class PickledObject(msgspec.Struct, frozen=True, tag="pickled", array_like=True):
    """Any other object, pickled only because the caller explicitly allowed it."""

    data: bytes


Leaf: TypeAlias = TensorInArena | TensorInline | PlainValue | BigIntValue | PickledObject


class ArenaRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A shared-memory file the worker maps: its path and size in bytes."""

    path: str
    size: int


class StateDictPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="whole"):
    """A state dict: its containers (``skeleton``) and its leaves, in ``flatten`` order.

    ``plan_id`` names the trainer's staging plan it was laid out by: two payloads of the same
    plan have the same skeleton and the same arena leaves (``TensorInArena``); only their
    other leaves (plain values) may differ. A write of the same plan as the last one sent is
    sent as a ``RepeatedStateDict`` (see ``aiockpt._wire.session``)."""

    skeleton: Node
    leaves: list[Leaf]
    arena: ArenaRef | None = None
    plan_id: int | None = None


class RepeatedStateDict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="repeated"):
    """The state dict of the last ``StateDictPayload`` sent on the channel, whose plan is
    ``plan_id``, with its leaves outside the arena replaced by ``others`` (in order) and its
    tensors' bytes in ``arena``: a repeated save's frame carries its plain values only (a
    save of 20,000 tensors ~100 bytes instead of ~1 MB, which the trainer no longer encodes
    and the worker no longer decodes)."""

    plan_id: int
    others: list[Leaf]
    arena: ArenaRef | None = None


# --- requests ----------------------------------------------------------------------------------


class InitPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="init"):
    protocol_version: int
    rank_info: RankInfo
    #: the parent's sys.path, so that import references resolve in the worker as in the parent
    sys_path: list[str]
    subprocess_init_fn: str | None
    subprocess_init_args: list[Any]
    checkpoint_writer_init_fn: str
    checkpoint_writer_init_args: dict[str, Any]
    gc: GcOptions = GcOptions()
    #: set when the worker is one rank of a multi-rank Checkpointer
    group: GroupInfo | None = None


class CommitOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Write through ``aiockpt._format.commit``: temporary sibling, manifest, fsync, rename."""

    #: a built-in format name ("dcp", "safetensors") or a writer's import reference
    format: str
    overwrite: bool = False
    metadata: dict[str, Any] | None = None
    #: which save of its group session this is: the ranks' workers meet under this name.
    #: It is the checkpoint's path (relative to the root) and how many saves to that path
    #: came before, so a rank that skipped or added a save cannot shift the saves after it.
    #: Only read when the worker belongs to a group.
    round_id: str = ""
    #: a finished round whose keys rank 0's worker deletes (two saves back: no rank can
    #: still be reading them without having timed out)
    forget_round: str | None = None
    #: keywords for the format's writer (``max_shard_size`` for safetensors)
    writer_options: dict[str, Any] | None = None


class WritePayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="write"):
    path: str
    #: a ``RepeatedStateDict`` only on the channel: the worker's session expands it on receipt
    state_dict: StateDictPayload | RepeatedStateDict
    kwargs: dict[str, Any] = {}
    #: None: call the worker's writer on ``path`` as is (torch's CheckpointProcess semantics)
    commit: CommitOptions | None = None
    #: report progress (``ProgressPayload``) each time the worker has written this many more
    #: bytes, and once when the files are written; None: no reports
    progress_bytes: int | None = None
    #: None: the arena holds every tensor byte already. A number: the write was sent while
    #: the trainer still copies into the arena, in offset order; this many bytes from its
    #: start are there, and STAGED requests (``StagedPayload``) say when more are
    staged_bytes: int | None = None


class StagedPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="staged"):
    """The arena bytes of write ``request_id`` below offset ``nbytes`` are staged; with
    ``complete``, all of them are."""

    request_id: int
    nbytes: int
    complete: bool = False


class CancelPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="cancel"):
    request_id: int


class ArenaPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="arena_ref"):
    arena: ArenaRef


class WorkerRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: int
    request_type: RequestType
    payload: InitPayload | WritePayload | CancelPayload | ArenaPayload | StagedPayload | None = None


# --- responses ---------------------------------------------------------------------------------


class ReadyPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="ready"):
    protocol_version: int
    pid: int


class WriteResultPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="written"):
    #: seconds the writer took in the worker
    write_seconds: float
    #: whatever the writer returned, when it is msgspec-encodable
    result: Any = None


class ProgressPayload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="progress"):
    """A report on a write in progress, not its answer: bytes the worker has written to the
    checkpoint's files so far (data, framing and metadata; this rank's share of a multi-rank
    save)."""

    bytes_written: int


class WorkerResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: int
    request_type: RequestType
    success: bool
    #: on failure: the exception's qualified type name, its message, and the full traceback
    error_type: str | None = None
    error_msg: str | None = None
    traceback: str | None = None
    payload: ReadyPayload | WriteResultPayload | ProgressPayload | None = None
    #: a multi-rank save that failed because of another rank names that rank here
    failed_rank: int | None = None


class _InitProbe(msgspec.Struct, tag="init"):
    protocol_version: int


class _RequestProbe(msgspec.Struct):
    payload: _InitProbe | None = None


class _ReadyProbe(msgspec.Struct, tag="ready"):
    protocol_version: int


class _ResponseProbe(msgspec.Struct):
    payload: _ReadyProbe | None = None


# --- framing -----------------------------------------------------------------------------------


def encode_frame(body: bytes) -> bytes:
    """Prefix ``body`` with its length."""
    if len(body) > _LENGTH_MAX:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the 4 GiB length prefix")
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Turns a byte stream, fed in arbitrary chunks, into frame bodies."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size <= _LENGTH_MAX:
            raise ValueError(f"max_frame_size must be in 1..{_LENGTH_MAX}, got {max_frame_size}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that do not make a whole frame yet (non-zero at EOF: truncated)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame body completed by it, in order.

        Raises ``ProtocolError`` when a length prefix exceeds ``max_frame_size``; the decoder
        is unusable afterwards (the stream has lost its framing).
        """
        self._buffer += data
        frames: list[bytes] = []
        start = 0
        end = len(self._buffer)
        while end - start >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, start)
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum frame size of "
                    f"{self.max_frame_size} bytes"
                )
            if end - start - _LENGTH.size < length:
                break
            body_start = start + _LENGTH.size
            frames.append(bytes(self._buffer[body_start : body_start + length]))
            start = body_start + length
        del self._buffer[:start]
        return frames


class MessageCodec:
    """Encodes and decodes the two message types; every decoding failure is a ProtocolError."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._request_decoder = msgspec.msgpack.Decoder(WorkerRequest)
        self._response_decoder = msgspec.msgpack.Decoder(WorkerResponse)
        self._request_probe = msgspec.msgpack.Decoder(_RequestProbe)
        self._response_probe = msgspec.msgpack.Decoder(_ResponseProbe)

    def encode(self, message: WorkerRequest | WorkerResponse) -> bytes:
        """The whole frame (length prefix included) for ``message``."""
        return encode_frame(self._encoder.encode(message))

    def decode_request(self, body: bytes) -> WorkerRequest:
        request: WorkerRequest = self._decode(self._request_decoder, body, "request")
        return request

    def decode_response(self, body: bytes) -> WorkerResponse:
        response: WorkerResponse = self._decode(self._response_decoder, body, "response")
        return response

    def check_handshake_request(self, body: bytes) -> None:
        """Raise ``ProtocolVersionMismatch`` if ``body`` is an INIT of another version."""
        probe = self._decode(self._request_probe, body, "handshake request")
        if probe.payload is not None:
            check_version(probe.payload.protocol_version, "parent")

    def check_handshake_response(self, body: bytes) -> None:
        """Raise ``ProtocolVersionMismatch`` if ``body`` is a READY of another version."""
        probe = self._decode(self._response_probe, body, "handshake response")
        if probe.payload is not None:
            check_version(probe.payload.protocol_version, "worker")

    @staticmethod
    def _decode(decoder: msgspec.msgpack.Decoder[Any], body: bytes, what: str) -> Any:
        try:
            return decoder.decode(body)
        # msgspec raises UnicodeDecodeError for a str that is not UTF-8, and RecursionError
        # for nesting deeper than it recurses: both are malformed frames too.
        except (
            msgspec.DecodeError,
            msgspec.ValidationError,
            UnicodeDecodeError,
            RecursionError,
        ) as exc:
            raise ProtocolError(f"malformed {what} frame ({len(body)} bytes): {exc}") from exc


def check_version(peer_version: int, peer: str) -> None:
    """Raise ``ProtocolVersionMismatch`` unless ``peer_version`` is ours."""
    if peer_version != PROTOCOL_VERSION:
        raise ProtocolVersionMismatch(
            f"the {peer} speaks aiockpt protocol version {peer_version}, this side speaks "
            f"{PROTOCOL_VERSION}; install the same aiockpt version on both sides"
        )
