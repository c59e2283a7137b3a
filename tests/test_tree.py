"""``flatten`` and ``unflatten`` put every state dict back exactly: a property test."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiockpt._format.tree import Node, flatten, iter_key_paths, unflatten
from aiockpt._wire.tensors import is_tensor

Point = namedtuple("Point", ["x", "y"])

ROUND_TRIPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

#: every key type a checkpoint can name: str (any valid Unicode) and ints of 64 bits
KEYS = st.one_of(st.text(max_size=8), st.integers(min_value=-(2**63), max_value=2**64 - 1))

TENSORS = st.builds(
    lambda values, dtype: torch.tensor(values, dtype=dtype),
    st.lists(st.integers(-100, 100), max_size=4),
    st.sampled_from([torch.float32, torch.int64, torch.bfloat16]),
)

LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    TENSORS,
    st.builds(Point, st.integers(), st.none()),  # a named tuple is a leaf, not a container
)

TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.dictionaries(KEYS, children, max_size=4),
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
    ),
    max_leaves=20,
)


def assert_same_tree(rebuilt: Any, original: Any, path: str = "") -> None:
    """Same containers of the same types with the same keys (and key types, in order), and
    the very same leaf objects."""
    assert type(rebuilt) is type(original), f"{path}: {type(rebuilt)} != {type(original)}"
    if isinstance(original, dict):
        assert [(type(k), k) for k in rebuilt] == [(type(k), k) for k in original], path
        for key in original:
            assert_same_tree(rebuilt[key], original[key], f"{path}.{key}")
    elif isinstance(original, (list, tuple)) and not hasattr(original, "_fields"):
        assert len(rebuilt) == len(original), path
        for i, (a, b) in enumerate(zip(rebuilt, original, strict=True)):
            assert_same_tree(a, b, f"{path}[{i}]")
    else:
        assert rebuilt is original, path


@ROUND_TRIPS
@given(TREES)
def test_unflatten_rebuilds_what_flatten_split(tree: Any) -> None:
    skeleton, pairs = flatten(tree, is_tensor)
    assert_same_tree(unflatten(skeleton, [leaf for _, leaf in pairs]), tree)
    # The skeleton crosses the channel and goes into the manifest: it survives msgpack, and
    # the key paths it gives are the ones flatten gave.
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(skeleton), type=Node)
    assert decoded == skeleton
    assert list(iter_key_paths(decoded)) == [(i, path) for i, (path, _) in enumerate(pairs)]


@pytest.mark.parametrize("key", [True, 1.5, None, ("a",), 2**64, -(2**63) - 1, "\ud800"])
def test_keys_no_checkpoint_can_name_are_refused_naming_where(key: Any) -> None:
    with pytest.raises(TypeError, match=r"'outer\.0'"):
        flatten({"outer": [{key: 1}]}, is_tensor)
