"""Tensors and plain values <-> the protocol's leaf descriptions (both sides of the channel)."""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from aiockpt._format.manifest import is_plain
from aiockpt._format.stateful import is_stateful
from aiockpt._format.tree import KeyPath, flatten, format_key_path
from aiockpt._wire.protocol import (
    BigIntValue,
    Leaf,
    PickledObject,
    PlainValue,
    StateDictPayload,
    TensorInArena,
    TensorInline,
)

__all__ = [
    "as_bytes",
    "describe_inline",
    "dtype_from_name",
    "dtype_name",
    "inline_tensor",
    "is_tensor",
    "tensor_addresses",
    "tensor_from_leaf",
    "tensors_guard",
    "value_from_leaf",
    "value_leaf",
]

# msgpack carries ints in this range exactly; larger ones travel as BigIntValue.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _tensor_guards_class() -> Any:
    try:
        from torch._C._dynamo.guards import TensorGuards
    except ImportError:  # pragma: no cover (another torch)
        return None
    return TensorGuards


_TensorGuards: Any = _tensor_guards_class()


def tensor_addresses(tensors: list[torch.Tensor]) -> list[int]:
    """Where each tensor's memory starts (``data_ptr``), in one pass in C: what a
    ``tensors_guard`` does not see (``.data =`` moves memory and keeps all it checks)."""
    return list(map(torch.Tensor.data_ptr, tensors))


def tensors_guard(tensors: list[torch.Tensor]) -> Any:
    """torch's ``TensorGuards`` over ``tensors`` (what ``torch.compile`` checks its inputs
    with: Python type, dispatch keys, dtype, device, requires_grad, sizes and strides of many
    tensors in one call, in C): ``guard.check(*others)`` says whether ``others`` match them
    one for one. It keeps no reference to them, and says nothing of their memory (compare
    ``data_ptr`` for that). None in a torch whose guard cannot be made (no caching then)."""
    if _TensorGuards is None:
        return None  # pragma: no cover (another torch)
    try:
        return _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except TypeError:  # pragma: no cover (a torch whose TensorGuards is called otherwise)
        return None


# dtype <-> name, as in ``str(torch.float32)`` without the prefix. Built from torch itself so
# that new dtypes work, and looked up in this table on load: a manifest is data read from disk,
# and ``getattr(torch, name)`` on it could return anything.
_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}


# str(dtype) takes tens of microseconds: too slow for thousands of tensors per save.
_DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in _DTYPES.items() if str(d) == f"torch.{n}"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    name = _DTYPE_NAMES.get(dtype)
    return name if name is not None else str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"bfloat16"``); ValueError if there is none."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's bytes (any dtype, 0-d and empty too)."""
    return tensor.reshape(-1).view(torch.uint8)


def inline_tensor(tensor: torch.Tensor) -> TensorInline:
    """Describe ``tensor`` with its bytes copied into the description."""
    flat = tensor.detach().to("cpu").contiguous()
    return TensorInline(dtype_name(flat.dtype), list(flat.shape), as_bytes(flat).numpy().tobytes())


def value_leaf(path: KeyPath, value: Any, *, allow_pickle: bool) -> Leaf:
    """Describe a non-tensor leaf, checking here, in the caller, that it can be encoded.

    Plain values (``aiockpt._format.manifest.is_plain``: exactly ``int``, ``float``, ``str``,
    ``bool``, ``None`` or ``bytes``) travel as themselves; a subclass (``IntEnum``,
    ``numpy.float64``) would come back as another type, or not encode at all, so it is
    pickled when ``allow_pickle`` allows, like any other object. Ints beyond msgpack's 64
    bits travel as ``BigIntValue``.

    Raises ``TypeError`` naming the key for an object that is not a plain value, unless
    ``allow_pickle`` says the caller accepts pickling it, and for a plain value no checkpoint
    can hold: a str that is not valid Unicode (a lone surrogate), an int too long to write
    as decimal text (``sys.get_int_max_str_digits``).
    """
    kind = type(value)
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return PlainValue(value)
        try:
            return BigIntValue(str(value))
        except ValueError:  # more digits than int <-> str conversions allow
            raise TypeError(
                f"state dict entry {format_key_path(path)!r} is an int of "
                f"{value.bit_length()} bits, too large to checkpoint"
            ) from None
    if kind is str and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            raise TypeError(
                f"state dict entry {format_key_path(path)!r} is not valid Unicode ({exc.reason} "
                f"at {exc.start}); it cannot be written as UTF-8"
            ) from None
    if is_plain(value):
        return PlainValue(value)
    if allow_pickle:
        return PickledObject(_pickle_importable(path, value))
    if is_stateful(value):
        raise TypeError(
            f"state dict entry {format_key_path(path)!r} is Stateful ({kind.__qualname__}) "
            "below the top level: state_dict() is called, as torch's DCP calls it, only on the "
            "state dict itself and on its top-level values; move it up or save its "
            "state_dict()"
        )
    raise TypeError(
        f"state dict entry {format_key_path(path)!r} is a {kind.__qualname__}; only "
        "tensors, int, float, str, bool, None, bytes (exactly: not subclasses) and "
        "lists/tuples/dicts of these can be checkpointed without pickling (convert it, e.g. "
        "int(x) or float(x), or pass allow_pickle=True to pickle it)"
    )


class _ImportablePickler(pickle.Pickler):
    """Refuses what only this process can unpickle: classes and functions of ``__main__``
    (the worker's ``__main__`` is aiockpt's, so they would fail there with a bare
    ``AttributeError``)."""

    def reducer_override(self, obj: Any) -> Any:
        if getattr(obj, "__module__", None) == "__main__" and (
            isinstance(obj, type) or callable(obj)
        ):
            raise _DefinedInMain(getattr(obj, "__qualname__", repr(obj)))
        return NotImplemented


class _DefinedInMain(Exception):
    pass


def _pickle_importable(path: KeyPath, value: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        _ImportablePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    except _DefinedInMain as exc:
        raise TypeError(
            f"state dict entry {format_key_path(path)!r} cannot be pickled for the checkpoint "
            f"worker: it uses {exc.args[0]!r}, defined in __main__, which no other process "
            "can import; define it in an importable module"
        ) from None
    return buffer.getvalue()


def tensor_from_leaf(leaf: TensorInArena | TensorInline, arena: memoryview | None) -> torch.Tensor:
    """The tensor a leaf describes; arena tensors are views of ``arena`` (no copy).

    Raises ``ValueError`` when the description does not fit its bytes.
    """
    dtype = dtype_from_name(leaf.dtype)
    shape = tuple(leaf.shape)
    if isinstance(leaf, TensorInline):
        # torch.frombuffer wants a writable buffer; inline tensors are small, copying is fine.
        buffer: memoryview | bytearray = bytearray(leaf.data)
        offset, nbytes = 0, len(leaf.data)
    else:
        if arena is None:
            raise ValueError("tensor described in an arena, but the request names no arena")
        buffer, offset, nbytes = arena, leaf.offset, leaf.nbytes
        if offset < 0 or offset + nbytes > len(arena):
            raise ValueError(f"tensor bytes {offset}..{offset + nbytes} lie outside the arena")
    expected = _numel(shape) * dtype.itemsize
    if nbytes != expected:
        raise ValueError(f"{nbytes} bytes cannot hold a {leaf.dtype} tensor of shape {shape}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(dtype).reshape(shape)


def value_from_leaf(leaf: PlainValue | BigIntValue | PickledObject) -> Any:
    """The value a non-tensor leaf stands for (the worker's side of ``value_leaf``)."""
    if isinstance(leaf, PlainValue):
        return leaf.value
    if isinstance(leaf, BigIntValue):
        return int(leaf.value)
    return pickle.loads(leaf.data)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        n *= d
    return n


def describe_inline(state_dict: Any, *, allow_pickle: bool = False) -> StateDictPayload:
    """Describe ``state_dict`` with every tensor's bytes copied into the description.

    For small ad-hoc writes through a bare ``CheckpointProcess``; saves go through a
    shared-memory arena instead. Raises ``TypeError`` naming the key of an entry that cannot
    cross the process boundary.
    """
    skeleton, leaves = flatten(state_dict, is_tensor)
    return StateDictPayload(
        skeleton,
        [
            inline_tensor(value)
            if is_tensor(value)
            else value_leaf(path, value, allow_pickle=allow_pickle)
            for path, value in leaves
        ],
    )
