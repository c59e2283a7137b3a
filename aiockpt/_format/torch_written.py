"""Checkpoints that ``torch.distributed.checkpoint.save`` wrote: found, listed, and loaded
only through torch's own reader when the caller allows unpickling.

torch's ``FileSystemWriter`` writes every rank's data files, then ``.metadata`` (through a
temporary name and a rename), so a directory holding ``.metadata`` is a checkpoint torch
finished; one without it is a save that did not finish, as a directory without aiockpt's
manifest is. aiockpt's own DCP checkpoints hold both ``.metadata`` and the manifest.

A torch-written checkpoint has no manifest, so nothing can verify it (no sizes, no
checksums), and torch reads it by unpickling ``.metadata`` (and ``torch.load`` of any object
saved in it). So such a directory is listed, marked ``unverified``, and ``aiockpt.load``
raises ``ForeignCheckpoint`` for it unless the caller passes ``allow_pickle=True``, and then
loads it with torch's ``dcp.load`` (with ``no_dist``: no collective runs on the caller's
process group; DTensors still get their own slice, as torch's planner reads each rank's
pieces from the metadata) and logs a warning that it is unverified.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from typing import Any

__all__ = ["TORCH_METADATA_NAME", "is_torch_written", "load_torch_written"]

logger = logging.getLogger("aiockpt._format.torch_written")

#: the file torch's ``FileSystemWriter`` writes last, whose presence means a finished save
TORCH_METADATA_NAME = ".metadata"


def is_torch_written(path: str | os.PathLike[str], manifest_name: str) -> bool:
    """Whether ``path`` is a directory holding torch's ``.metadata`` (a regular file) and no
    ``manifest_name``: a checkpoint torch's DCP finished and aiockpt did not commit."""
    try:
        metadata = os.lstat(os.path.join(path, TORCH_METADATA_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return False
    return stat.S_ISREG(metadata.st_mode) and not os.path.lexists(os.path.join(path, manifest_name))


def load_torch_written(path: str | os.PathLike[str], state_dict: Any = None) -> Any:
    """Load the torch-written checkpoint at ``path`` with torch's ``dcp.load``, unverified
    (the caller has allowed unpickling); without ``state_dict``, the whole checkpoint as
    nested dicts (as torch's ``_EmptyStateDictLoadPlanner`` rebuilds it); with one (a
    dict), fill it in place, DTensors with their slice, and return it.

    Raises ``TypeError`` for a ``state_dict`` that is not a dict (torch's DCP loads into
    dicts only) and what ``torch.distributed.checkpoint.load`` raises (``CheckpointException``
    for a key the checkpoint lacks or a file it cannot read).
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    if state_dict is not None and not isinstance(state_dict, dict):
        raise TypeError(
            f"{os.fspath(path)!r} was written by torch's DCP, which loads into a dict; the state "
            f"dict is a {type(state_dict).__qualname__}"
        )
    logger.warning(
        "loading %s with torch's DCP reader, unverified: torch.distributed.checkpoint wrote "
        "it without an aiockpt manifest, so no sizes or checksums are checked",
        os.fspath(path),
    )
    if state_dict is None:
        # What dcp.load does without its copy back of the caller's keys (there are none):
        # the planner builds the tree from the metadata.
        whole: dict[str, Any] = {}
        _load_state_dict(
            whole,
            FileSystemReader(os.fspath(path)),
            planner=_EmptyStateDictLoadPlanner(),  # type: ignore[no-untyped-call]
            no_dist=True,
        )
        return whole
    with warnings.catch_warnings():
        # no_dist is deliberate (no collective on the caller's group): not worth a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state_dict, checkpoint_id=os.fspath(path), no_dist=True)
    return state_dict
