"""The manifest: the one file whose presence makes a directory a checkpoint.

A checkpoint directory holds the files a writer produced (DCP data files and ``.metadata``, or
safetensors files) plus ``aiockpt-manifest.json``, written last, which names every file with its
size and xxh3_64 checksum, and describes the state dict: its ``skeleton`` (the tree with int
keys and tuples intact, see ``aiockpt._format.tree``) and one entry per leaf, in skeleton order:

* ``tensor``: raw little-endian bytes of a tensor at ``offset`` in ``file`` (contiguous, or
  a piece strided inside a tensor stored whole);
* ``value`` / ``float`` / ``bigint`` / ``bytes``: plain values stored in the manifest itself
  (floats as ``repr`` text so that nan, inf and -0.0 survive JSON);
* ``object``: a pickle at ``offset`` in ``file`` (only when the user opted into pickling; never
  unpickled on load unless the caller allows it);
* ``opaque``: a leaf a custom writer stored in its own way, which only its format can read.

Example (abridged)::

    {"format_version": 3, "format": "safetensors", "world_size": 1,
     "files": [{"name": "model.safetensors", "size": 1088, "xxh3_64": "3b5d..."}],
     "skeleton": ["dict", ["w", "step"], [["leaf", 0], ["leaf", 1]]],
     "leaves": [{"type": "tensor", "file": "model.safetensors", "offset": 64,
                 "dtype": "float32", "shape": [16, 16]},
                {"type": "value", "value": 100}],
     "metadata": {"epoch": 3},
     "manifest_sha256": "9f86d0..."}

A save by several ranks adds ``"ranks"``: the skeleton and leaves of ranks 1, 2, ... (rank 0's
are the top-level ones).

The manifest checks itself: the file always ends with ``,"manifest_sha256":"<64 hex>"}``, the
SHA-256 of every byte before that suffix, and ``decode_manifest`` compares it before it parses
anything, so a flipped bit anywhere (an offset, a shape, ``step``, a key) is an error rather
than different data. The suffix is fixed-length, so that the body that was hashed is exactly
the file minus it, with no canonical re-encoding; the file stays plain JSON. (Against someone
who can write the directory the checksum proves nothing: they can write a matching one. What
keeps a reader inside the checkpoint is ``check_relative_name`` and how ``aiockpt._format.loading``
opens files.) Format version 1 had no checksum, so it is not read any more.

Everything here is plain msgspec: no torch import, no I/O.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import msgspec

from aiockpt._format.tree import Node

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "OLDEST_READ_FORMAT_VERSION",
    "PLAIN_TYPES",
    "BigIntLeaf",
    "BytesLeaf",
    "FileEntry",
    "FloatLeaf",
    "Leaf",
    "Manifest",
    "ObjectLeaf",
    "OpaqueLeaf",
    "RankState",
    "TensorLeaf",
    "ValueLeaf",
    "check_relative_name",
    "decode_manifest",
    "dtype_itemsize",
    "encode_manifest",
    "format_version_of",
    "is_plain",
    "plain_leaf",
    "plain_value",
]

#: bumped when a reader of an older version could misread a newer manifest (2: the manifest
#: carries its own checksum; 3: a tensor leaf may be strided, ``TensorLeaf.strides``, which
#: a reader of version 2 would ignore and so read the wrong bytes). A manifest is written
#: with the lowest version that describes it (``format_version_of``), so that an older
#: aiockpt still reads every checkpoint it could read before.
FORMAT_VERSION = 3
#: the oldest version this aiockpt still reads (every version-2 manifest is a valid version 3)
OLDEST_READ_FORMAT_VERSION = 2
#: file name of the manifest inside a checkpoint directory
MANIFEST_NAME = "aiockpt-manifest.json"
#: the largest manifest a reader accepts. A manifest costs ~150 bytes per leaf, so this allows
#: millions of leaves, and stops a reader from being fed /dev/zero or a runaway file.
MAX_MANIFEST_BYTES = 1 << 30

# msgpack and JSON both carry ints in this range exactly; larger ones go through BigIntLeaf.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class FileEntry(msgspec.Struct, frozen=True):
    """One file of a checkpoint: its name relative to the checkpoint directory."""

    name: str
    size: int
    xxh3_64: str


class TensorLeaf(msgspec.Struct, frozen=True, tag="tensor", tag_field="type", omit_defaults=True):
    """A tensor stored as raw little-endian bytes from ``offset`` in ``file``: contiguous,
    or, with ``strides``, strided.

    A rank's piece of a sharded tensor (a DTensor's local shard) also says where it lies in
    the whole: ``global_shape`` and ``global_offset`` (the index of its first element), so
    that a loader can reshard without DCP's pickled ``.metadata``. Both are absent (omitted
    from the JSON) for a whole tensor.

    ``strides`` (in elements; absent for a contiguous tensor): where a piece lies inside the
    bytes of a larger tensor stored whole, as a column piece does in a safetensors file,
    which holds every tensor whole. The tensor is then the view of the file's bytes from
    ``offset`` (its first element) with ``shape`` and these strides.
    """

    file: str
    offset: int
    dtype: str
    shape: list[int]
    global_shape: list[int] | None = None
    global_offset: list[int] | None = None
    strides: list[int] | None = None


class ObjectLeaf(msgspec.Struct, frozen=True, tag="object", tag_field="type"):
    """A pickled object of ``nbytes`` at ``offset`` in ``file`` (user opted into pickling)."""

    file: str
    offset: int
    nbytes: int


class ValueLeaf(msgspec.Struct, frozen=True, tag="value", tag_field="type"):
    """A str, bool, None or 64-bit int, stored in the manifest itself."""

    value: int | str | bool | None


class FloatLeaf(msgspec.Struct, frozen=True, tag="float", tag_field="type"):
    """A float as ``repr`` text: JSON has no nan or inf, and ``float(repr(x)) == x``."""

    value: str


class BigIntLeaf(msgspec.Struct, frozen=True, tag="bigint", tag_field="type"):
    """An int outside the 64-bit range, as decimal text."""

    value: str


class BytesLeaf(msgspec.Struct, frozen=True, tag="bytes", tag_field="type"):
    """A bytes value (base64 in JSON)."""

    value: bytes


class OpaqueLeaf(msgspec.Struct, frozen=True, tag="opaque", tag_field="type"):
    """A leaf a custom writer stored without telling where; ``kind`` is its Python type name."""

    kind: str


Leaf: TypeAlias = (
    TensorLeaf | ObjectLeaf | ValueLeaf | FloatLeaf | BigIntLeaf | BytesLeaf | OpaqueLeaf
)


class RankState(msgspec.Struct, frozen=True):
    """The state dict one rank saved: its skeleton and leaves, as in ``Manifest``."""

    skeleton: Node
    leaves: list[Leaf]


#: bytes per element of every dtype a ``TensorLeaf`` may name (torch's dtype without the
#: ``torch.`` prefix), so that a manifest is checked without importing torch (the ``aiockpt``
#: command's ``ls`` and ``verify`` do not). tests/test_hostile_input.py checks it against
#: torch's own dtypes: a torch with a new dtype fails that test until it is added here.
_DTYPE_ITEMSIZES: dict[str, int] = {
    **dict.fromkeys(("bits1x8", "bits2x4", "bits4x2", "bits8", "bool", "float4_e2m1fn_x2"), 1),
    **dict.fromkeys(
        ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"),
        1,
    ),
    **dict.fromkeys(("int1", "int2", "int3", "int4", "int5", "int6", "int7", "int8", "qint8"), 1),
    **dict.fromkeys(("quint2x4", "quint4x2", "quint8"), 1),
    **dict.fromkeys(("uint1", "uint2", "uint3", "uint4", "uint5", "uint6", "uint7", "uint8"), 1),
    **dict.fromkeys(("bfloat16", "bits16", "float16", "int16", "uint16"), 2),
    **dict.fromkeys(("complex32", "float32", "int32", "qint32", "uint32"), 4),
    **dict.fromkeys(("complex64", "float64", "int64", "uint64"), 8),
    "complex128": 16,
}


def dtype_itemsize(name: str) -> int:
    """Bytes per element of the dtype called ``name`` (``"bfloat16"`` -> 2); ValueError for
    a name that is no torch dtype."""
    try:
        return _DTYPE_ITEMSIZES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def format_version_of(leaf_lists: Iterable[Sequence[Leaf]]) -> int:
    """The lowest format version that describes a manifest of these ranks' leaves: 3 when
    a tensor leaf is strided, else 2."""
    for leaves in leaf_lists:
        for leaf in leaves:
            if type(leaf) is TensorLeaf and leaf.strides is not None:
                return FORMAT_VERSION
    return OLDEST_READ_FORMAT_VERSION


class Manifest(msgspec.Struct, frozen=True):
    """Everything needed to verify and load a checkpoint directory without unpickling.

    A save by several ranks describes rank 0's state dict in ``skeleton`` and ``leaves`` and
    every other rank's in ``ranks`` (rank 1 first); a leaf of any rank may point into a file
    another rank wrote (a replicated tensor is written once).
    """

    format_version: int
    format: str
    files: list[FileEntry]
    skeleton: Node
    leaves: list[Leaf]
    metadata: dict[str, Any] = {}
    world_size: int = 1
    ranks: list[RankState] = []

    def rank_state(self, rank: int) -> RankState:
        """The state dict ``rank`` saved; raises ValueError for a rank not in the save."""
        if not 0 <= rank < max(1, len(self.ranks) + 1):
            raise ValueError(
                f"rank {rank} is not in this checkpoint (saved by {self.world_size} ranks)"
            )
        return RankState(self.skeleton, self.leaves) if rank == 0 else self.ranks[rank - 1]


#: the types of plain values, which the manifest (and the channel) carry as themselves
PLAIN_TYPES = frozenset({int, float, str, bool, bytes, type(None)})


def is_plain(value: Any) -> bool:
    """Whether ``value`` is a plain value: exactly ``int``, ``float``, ``str``, ``bool``,
    ``None`` or ``bytes``. Not a subclass: an ``IntEnum`` or ``numpy.float64`` stored as its
    base type would come back as another type, so such values are pickled (where allowed)
    like any other object. The one rule both the channel and the manifest follow."""
    return type(value) in PLAIN_TYPES


def plain_leaf(value: Any) -> Leaf | None:
    """The manifest entry for a plain leaf value, or None if ``value`` is not plain
    (``is_plain``)."""
    if not is_plain(value):
        return None
    kind = type(value)
    if kind is float:
        return FloatLeaf(repr(value))
    if kind is int:
        return ValueLeaf(value) if _INT_MIN <= value <= _INT_MAX else BigIntLeaf(str(value))
    if kind is str or kind is bool or value is None:
        return ValueLeaf(value)
    return BytesLeaf(value)  # the last of the plain types


def plain_value(leaf: ValueLeaf | FloatLeaf | BigIntLeaf | BytesLeaf) -> Any:
    """The Python value a plain leaf entry stands for (inverse of ``plain_leaf``)."""
    if isinstance(leaf, FloatLeaf):
        return float(leaf.value)
    if isinstance(leaf, BigIntLeaf):
        return int(leaf.value)
    return leaf.value


def check_relative_name(name: str) -> str:
    """Return ``name`` if it names a file inside a checkpoint directory, else raise ValueError.

    Manifests are data read from disk: a name such as ``../../etc/passwd`` or ``/etc/passwd``
    must never make a reader (or remover) touch anything outside the checkpoint.
    """
    normalized = posixpath.normpath(name)
    if (
        not name
        or "\0" in name
        or "\\" in name
        or name.startswith("/")
        or normalized != name
        or normalized == "."
        or normalized.split("/")[0] == ".."
    ):
        raise ValueError(f"{name!r} is not a relative file name inside a checkpoint")
    return name


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Manifest)
_CHECKSUM_FIELD = b',"manifest_sha256":"'
# The exact end of every manifest: the checksum field, 64 lowercase hex digits, the brace.
_CHECKSUM_SUFFIX = re.compile(re.escape(_CHECKSUM_FIELD) + rb'([0-9a-f]{64})"\}\Z')
_SUFFIX_BYTES = len(_CHECKSUM_FIELD) + 64 + 2


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest file's bytes: JSON for ``manifest`` ending in its own SHA-256.

    Raises ``msgspec.EncodeError`` for unencodable user metadata.
    """
    body = _encoder.encode(manifest)[:-1]  # without its closing brace
    digest = hashlib.sha256(body).hexdigest().encode()
    return body + _CHECKSUM_FIELD + digest + b'"}'


def decode_manifest(data: bytes) -> Manifest:
    """Check the manifest file's own checksum, then parse it.

    Raises ``ValueError`` if ``data`` does not end in a checksum or does not match it (nothing
    in it is parsed then), ``msgspec.DecodeError`` (a ``ValueError``) if it is not a manifest,
    ``RecursionError`` for nesting deeper than msgspec decodes.
    """
    match = _CHECKSUM_SUFFIX.search(data, max(0, len(data) - _SUFFIX_BYTES))
    if match is None:
        raise ValueError(
            "the manifest does not end in its checksum (truncated, corrupt, or written by "
            "aiockpt before format version 2)"
        )
    body = data[: match.start()]
    if hashlib.sha256(body).hexdigest() != match.group(1).decode():
        raise ValueError("the manifest does not match its own checksum (altered or corrupt)")
    return _decoder.decode(body + b"}")
