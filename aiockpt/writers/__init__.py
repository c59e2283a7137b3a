"""Writers turn a state dict into files; commit makes those files a checkpoint.

Built-in formats are referenced by name, custom writers by import reference
(``"package.module:WriterClass"``); either way the writer is constructed as
``Writer(rank_info=RankInfo(...), **options)`` in the checkpoint worker.
"""

from __future__ import annotations

from typing import Any

from aiockpt._wire.protocol import RankInfo
from aiockpt._wire.refs import resolve_ref
from aiockpt.writers.base import FileRecord, Writer

__all__ = ["BUILTIN_WRITERS", "FileRecord", "Writer", "create_writer", "resolve_writer"]

#: format name -> import reference of its writer class
BUILTIN_WRITERS: dict[str, str] = {
    "dcp": "aiockpt.writers.dcp:DcpWriter",
    "safetensors": "aiockpt.writers.safetensors:SafetensorsWriter",
}


def resolve_writer(format: str) -> Any:
    """The writer class (or factory) for a format name or a ``"module:attribute"`` reference.

    Raises ValueError for an unknown name, ImportError for a reference that does not
    resolve (resolved as ``aiockpt._wire.refs.resolve_ref`` resolves init functions).
    """
    reference = BUILTIN_WRITERS.get(format, format)
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        known = ", ".join(sorted(BUILTIN_WRITERS))
        raise ValueError(
            f"unknown checkpoint format {format!r}: use one of {known} or 'module:attribute'"
        )
    return resolve_ref(reference)


def create_writer(format: str, rank_info: RankInfo | None = None, **options: Any) -> Writer:
    """Construct the writer for ``format`` (see ``resolve_writer``) with ``rank_info``.

    Raises what ``resolve_writer`` raises, TypeError for options the writer does not take,
    and TypeError if the result has no ``write`` method.
    """
    writer = resolve_writer(format)(rank_info=rank_info or RankInfo(), **options)
    if not isinstance(writer, Writer):
        raise TypeError(f"{format!r} made a {type(writer).__name__}, which has no write()")
    return writer
