"""The tensor side of the writer helpers (``aiockpt.writers.base`` holds the rest, without
torch): a state dict's leaves split into tensors and objects, each tensor made what a writer
writes from (plain, contiguous, on the CPU). Used by the built-in writers in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aiockpt._format.manifest import is_plain
from aiockpt._format.tree import KeyPath

__all__ = ["split_leaves", "tensor_for_write"]


def tensor_for_write(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor`` as a plain contiguous CPU tensor (a copy only if it is not one already).

    The worker hands writers contiguous CPU tensors; this keeps direct callers correct too.
    Raises TypeError, naming ``where``, for sparse, quantized or other non-strided tensors.
    """
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise TypeError(f"{where}: cannot checkpoint a {tensor.layout} / {tensor.dtype} tensor")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor.contiguous()


def split_leaves(
    leaves: Sequence[tuple[KeyPath, Any]],
) -> tuple[list[tuple[int, KeyPath, torch.Tensor]], list[tuple[int, Any]]]:
    """Tensor leaves ``(index, key path, tensor)`` and object leaves ``(index, object)``;
    plain values are left out (commit stores them in the manifest)."""
    tensors: list[tuple[int, KeyPath, torch.Tensor]] = []
    objects: list[tuple[int, Any]] = []
    for index, (path, value) in enumerate(leaves):
        if isinstance(value, torch.Tensor):
            tensors.append((index, path, value))
        elif not is_plain(value):
            objects.append((index, value))
    return tensors, objects
