"""The checkpoints under a root, whoever wrote them.

A directory directly under a root is listed if aiockpt committed it (its manifest; see
``commit.is_committed``) or if torch's ``dcp.save`` finished it (``.metadata`` without a
manifest; see ``aiockpt._format.torch_written``). The second kind is marked ``unverified``:
a run that switched from torch's DCP to aiockpt finds the checkpoints it wrote before,
instead of silently starting from scratch, and sees that they cannot be verified.

Retention never deletes unverified checkpoints (it goes by ``commit.list_committed``, which
lists aiockpt's only), and neither does anything else in aiockpt.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from aiockpt._format.commit import TEMP_PREFIX, TRASH_PREFIX, list_committed
from aiockpt._format.commit import _natural_key as natural_key
from aiockpt._format.manifest import MANIFEST_NAME
from aiockpt._format.torch_written import is_torch_written

__all__ = ["ListedCheckpoint", "list_checkpoints"]

#: step numbers in the names aiockpt (``step_0000000100``) and torchtitan (``step-100``) use
_STEP_IN_NAME = re.compile(r"step[_-](\d+)")


@dataclass(frozen=True)
class ListedCheckpoint:
    """A checkpoint found under a root.

    Attributes:
        path: the checkpoint directory.
        unverified: True for a checkpoint ``torch.distributed.checkpoint.save`` wrote (no
            aiockpt manifest): nothing can verify it, and ``aiockpt.load`` reads it only with
            ``allow_pickle=True``, through torch's reader (``ForeignCheckpoint`` otherwise).
        step: the step its name carries (``step_<n>`` or ``step-<n>``), else None.
    """

    path: str
    unverified: bool
    step: int | None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def list_checkpoints(root: str | os.PathLike[str]) -> list[ListedCheckpoint]:
    """The checkpoints directly under ``root``, aiockpt's and torch-written ones, in natural
    name order (``step_9`` before ``step_10``), the order ``Checkpointer.latest`` takes the
    last of; empty if ``root`` does not exist. Reads no file; takes no lock."""
    committed = set(list_committed(root))
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    # A save of aiockpt's in progress has .metadata before its manifest: its temporary
    # directory is never a torch-written checkpoint.
    torch_written = {
        entry.path
        for entry in entries
        if entry.path not in committed
        and not entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX))
        and is_torch_written(entry.path, MANIFEST_NAME)
    }
    paths = sorted(committed | torch_written, key=lambda p: natural_key(os.path.basename(p)))
    return [ListedCheckpoint(path, path in torch_written, _step_of(path)) for path in paths]


def _step_of(path: str) -> int | None:
    match = _STEP_IN_NAME.fullmatch(os.path.basename(path))
    return int(match[1]) if match else None
