"""State dicts as a skeleton plus a flat list of leaves.

A state dict is a tree of dicts, lists and tuples whose leaves are tensors or plain values.
Staging, the wire format and the writers all want the leaves in one flat list (to copy them,
describe them in a frame, or name them in a file), and the loader wants the tree back exactly:
dict keys that are ints stay ints (optimizer state), tuples stay tuples (Adam's ``betas``).

``flatten`` splits a tree into a ``Node`` skeleton, which is a msgspec-encodable value, and the
leaves in depth-first order; ``unflatten`` puts them back together. Nothing here knows about
torch: what counts as a leaf is decided by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import msgspec

__all__ = [
    "MAX_DEPTH",
    "DictNode",
    "KeyPath",
    "LeafNode",
    "ListNode",
    "Node",
    "TupleNode",
    "flatten",
    "format_key_path",
    "iter_key_paths",
    "unflatten",
]

#: the keys from the root to a leaf: ``("optimizer", "state", 0, "exp_avg")``
KeyPath: TypeAlias = tuple[str | int, ...]

#: the deepest nesting of containers a state dict may have. Real ones are under ten deep; the
#: bound lets every recursive walk here (and the loader's check of a manifest read from disk)
#: stay far inside Python's recursion limit.
MAX_DEPTH = 256


class LeafNode(msgspec.Struct, frozen=True, tag="leaf", array_like=True, gc=False):
    """Position ``index`` in the flat list of leaves (untracked by the garbage collector: one
    per tensor, and an int cannot form a cycle)."""

    index: int


class DictNode(msgspec.Struct, frozen=True, tag="dict", array_like=True):
    keys: list[str | int]
    children: list[Node]


class ListNode(msgspec.Struct, frozen=True, tag="list", array_like=True):
    children: list[Node]


class TupleNode(msgspec.Struct, frozen=True, tag="tuple", array_like=True):
    children: list[Node]


Node: TypeAlias = LeafNode | DictNode | ListNode | TupleNode


def format_key_path(path: KeyPath) -> str:
    """``("optimizer", "state", 0)`` -> ``"optimizer.state.0"``; the root is ``"<root>"``."""
    return ".".join(str(k) for k in path) if path else "<root>"


def flatten(tree: Any, is_leaf: Callable[[Any], bool]) -> tuple[Node, list[tuple[KeyPath, Any]]]:
    """Split ``tree`` into its skeleton and its ``(key path, leaf)`` pairs, depth first.

    Dicts, lists and tuples are containers unless ``is_leaf`` claims them; everything else is a
    leaf. Raises ``TypeError`` naming the key path for a dict key that is neither ``str`` nor
    ``int`` (such keys cannot be named in a checkpoint file), or for containers nested more
    than ``MAX_DEPTH`` deep.
    """
    leaves: list[tuple[KeyPath, Any]] = []
    return _visit(tree, (), is_leaf, leaves), leaves


def _visit(
    value: Any, path: KeyPath, is_leaf: Callable[[Any], bool], leaves: list[tuple[KeyPath, Any]]
) -> Node:
    # A module-level function, not a closure: a closure that calls itself is a reference
    # cycle holding ``leaves``, which kept the leaves (tensor views of a shared-memory arena
    # in the worker) alive until the garbage collector ran, so the arena could not be unmapped.
    if is_leaf(value):
        leaves.append((path, value))
        return LeafNode(len(leaves) - 1)
    if len(path) >= MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        raise TypeError(
            f"state dict entry {format_key_path(path)!r} nests containers more than "
            f"{MAX_DEPTH} deep; such a checkpoint could not be loaded again"
        )
    if isinstance(value, dict):
        keys: list[str | int] = []
        children: list[Node] = []
        for key, child in value.items():
            # bool is an int subclass, but True as a key would come back as 1.
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"state dict key {key!r} at {format_key_path(path)!r} is a "
                    f"{type(key).__name__}; only str and int keys can be checkpointed"
                )
            if not _encodable_key(key):
                raise TypeError(
                    f"state dict key {key!r} at {format_key_path(path)!r} cannot be "
                    "written: an int key must fit in 64 bits, a str key be valid Unicode"
                )
            keys.append(key)
            children.append(_visit(child, (*path, key), is_leaf, leaves))
        return DictNode(keys, children)
    if isinstance(value, list):
        return ListNode([_visit(c, (*path, i), is_leaf, leaves) for i, c in enumerate(value)])
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return TupleNode([_visit(c, (*path, i), is_leaf, leaves) for i, c in enumerate(value)])
    leaves.append((path, value))
    return LeafNode(len(leaves) - 1)


def _encodable_key(key: str | int) -> bool:
    """Whether both the channel (msgpack: 64-bit ints, UTF-8) and the manifest carry ``key``;
    checked here so that such a key fails in the caller, naming it, not later in an encoder."""
    if isinstance(key, int):
        return -(2**63) <= key <= 2**64 - 1
    if key.isascii():
        return True
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def unflatten(skeleton: Node, leaves: Sequence[Any]) -> Any:
    """Rebuild the tree that ``flatten`` split; ``leaves[i]`` goes where ``LeafNode(i)`` stands."""
    if isinstance(skeleton, LeafNode):
        return leaves[skeleton.index]
    if isinstance(skeleton, DictNode):
        return {
            k: unflatten(c, leaves) for k, c in zip(skeleton.keys, skeleton.children, strict=True)
        }
    if isinstance(skeleton, ListNode):
        return [unflatten(c, leaves) for c in skeleton.children]
    return tuple(unflatten(c, leaves) for c in skeleton.children)


def iter_key_paths(skeleton: Node, path: KeyPath = ()) -> Iterator[tuple[int, KeyPath]]:
    """Yield ``(leaf index, key path)`` for every leaf of ``skeleton``, depth first."""
    if isinstance(skeleton, LeafNode):
        yield skeleton.index, path
    elif isinstance(skeleton, DictNode):
        for key, child in zip(skeleton.keys, skeleton.children, strict=True):
            yield from iter_key_paths(child, (*path, key))
    else:
        for i, child in enumerate(skeleton.children):
            yield from iter_key_paths(child, (*path, i))
