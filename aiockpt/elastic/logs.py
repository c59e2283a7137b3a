"""Where each worker's stdout and stderr go, and the tee that copies them to the console.

Three destinations, chosen per local rank and per stream as torchelastic does:

- console: the worker inherits the agent's fd; nothing in the agent touches the bytes;
- redirect: the worker's fd *is* the log file (opened by the agent, written by the child), so
  redirected output costs the agent nothing, not even a wake-up;
- tee: the worker writes into a pipe; :func:`tee_stream`, a task on the agent's loop, appends
  each chunk to the log file and writes its complete lines to the console with a prefix
  (:class:`ConsoleLines`: linear in the bytes, and memory bounded however long a line is).
  torchelastic redirects into the file and tails it from a thread per file, polling; here the
  pipe wakes the loop, so there is no thread and no polling interval.

Layout: ``<log_dir>/<run_id>_<unique>/attempt_<restart>/<local_rank>/{stdout.log,stderr.log,
error.json}``: as torchrun's, a run's directory gets a suffix of its own, so that a rerun with
the same ``log_dir`` and run id (the default ``none``) keeps the earlier runs' logs.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import TextIO

__all__ = ["TEE_LINE_LIMIT", "ConsoleLines", "LogsDest", "LogsSpecs", "Std", "tee_stream", "to_map"]

logger = logging.getLogger(__name__)

_VALUE_REGEX = re.compile(r"^[0123]$")
_MAPPING_REGEX = re.compile(r"^(\d+:[0123],)*(\d+:[0123])$")
#: the chunk the tee reads at once
_TEE_CHUNK = 64 * 1024
#: the most characters of one line the tee holds back waiting for its end; a longer line
#: reaches the console in pieces this long (the log file gets every byte as it comes)
TEE_LINE_LIMIT = 64 * 1024
#: console line ends: a progress bar's lone ``\r`` too, as text-mode reading (torchelastic's
#: tail) sees it; otherwise a bar redrawn for hours is one ever-growing line
_LINE_END = re.compile(r"\r\n|\r|\n")


class Std(IntFlag):
    """Which standard streams a setting applies to."""

    NONE = 0
    OUT = 1
    ERR = 2
    ALL = OUT | ERR

    @classmethod
    def from_str(cls, vm: str) -> Std | dict[int, Std]:
        """Parse torchrun's syntax: ``"0"``..``"3"`` for every rank, ``"0:1,1:2"`` per rank.

        Raises ``ValueError`` for anything else.
        """
        if _VALUE_REGEX.match(vm):
            return cls(int(vm))
        if _MAPPING_REGEX.match(vm):
            mapping: dict[int, Std] = {}
            for item in vm.split(","):
                rank, value = item.split(":")
                mapping[int(rank)] = cls(int(value))
            return mapping
        raise ValueError(
            f"{vm} does not match: <{_VALUE_REGEX.pattern}> or <{_MAPPING_REGEX.pattern}>"
        )


def to_map(val_or_map: Std | dict[int, Std], local_world_size: int) -> dict[int, Std]:
    """One ``Std`` per local rank: a single value applies to all, a mapping defaults to NONE."""
    if isinstance(val_or_map, Std):
        return dict.fromkeys(range(local_world_size), val_or_map)
    return {rank: val_or_map.get(rank, Std.NONE) for rank in range(local_world_size)}


@dataclass
class LogsDest:
    """Destinations for one attempt, by local rank.

    ``stdouts``/``stderrs``: a file path, ``os.devnull``, or ``""`` for the console.
    ``tee_stdouts``/``tee_stderrs``: the ranks whose file is also copied to the console.
    ``error_files``: where each worker's ``record`` writes its exception.
    """

    stdouts: dict[int, str] = field(default_factory=dict)
    stderrs: dict[int, str] = field(default_factory=dict)
    tee_stdouts: dict[int, str] = field(default_factory=dict)
    tee_stderrs: dict[int, str] = field(default_factory=dict)
    error_files: dict[int, str] = field(default_factory=dict)


class LogsSpecs:
    """Log settings for every attempt of a run (torchelastic's ``DefaultLogsSpecs``).

    ``log_dir`` is created if missing (``None``: the agent uses a temporary directory that it
    removes at the end, keeping only error files' contents in the ``RunResult``).
    ``redirects`` sends streams to files only; ``tee`` to files and the console.
    ``local_ranks_filter`` limits what reaches the console to those ranks (files are complete).
    Raises ``NotADirectoryError`` if ``log_dir`` is an existing file.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        redirects: Std | dict[int, Std] = Std.NONE,
        tee: Std | dict[int, Std] = Std.NONE,
        local_ranks_filter: set[int] | None = None,
    ) -> None:
        if log_dir is not None:
            log_dir = os.fspath(log_dir)
            if os.path.isfile(log_dir):
                raise NotADirectoryError(f"log_dir: {log_dir} is a file")
            os.makedirs(log_dir, exist_ok=True)
        self.root_log_dir = log_dir
        self.redirects = redirects
        self.tee = tee
        self.local_ranks_filter = local_ranks_filter

    def __repr__(self) -> str:
        return (
            f"LogsSpecs(log_dir={self.root_log_dir!r}, redirects={self.redirects!r}, "
            f"tee={self.tee!r}, local_ranks_filter={self.local_ranks_filter!r})"
        )

    def reify(self, run_log_dir: str, restart_count: int, nprocs: int) -> LogsDest:
        """Create ``<run_log_dir>/attempt_<restart_count>/<rank>/`` (emptied first) and return
        where each stream goes. ``run_log_dir`` is the run's own directory, from
        :func:`make_run_log_dir`. Raises ``OSError`` from the file system.
        """
        attempt_dir = os.path.join(run_log_dir, f"attempt_{restart_count}")
        shutil.rmtree(attempt_dir, ignore_errors=True)
        os.makedirs(attempt_dir)
        redirects = to_map(self.redirects, nprocs)
        tees = to_map(self.tee, nprocs)
        dest = LogsDest()
        for rank in range(nprocs):
            rank_dir = os.path.join(attempt_dir, str(rank))
            os.mkdir(rank_dir)
            dest.error_files[rank] = os.path.join(rank_dir, "error.json")
            # a tee is a redirect that is also copied to the console
            to_file = redirects[rank] | tees[rank]
            shown = self.local_ranks_filter is None or rank in self.local_ranks_filter
            for stream, paths, tee_paths, name in (
                (Std.OUT, dest.stdouts, dest.tee_stdouts, "stdout.log"),
                (Std.ERR, dest.stderrs, dest.tee_stderrs, "stderr.log"),
            ):
                if to_file & stream:
                    paths[rank] = os.path.join(rank_dir, name)
                    if tees[rank] & stream and shown:
                        tee_paths[rank] = paths[rank]
                else:
                    paths[rank] = "" if shown else os.devnull
        return dest


def make_run_log_dir(log_dir: str, run_id: str) -> str:
    """Create and return a new directory ``<log_dir>/<run_id>_<unique>`` for one run.

    Unique per call, as torchelastic's ``DefaultLogsSpecs._make_log_dir``: a run never
    empties another run's attempt directories. Raises ``OSError`` from the file system.
    """
    run_log_dir = tempfile.mkdtemp(prefix=f"{run_id}_", dir=log_dir)
    logger.info("log directory set to: %s", run_log_dir)
    return run_log_dir


class ConsoleLines:
    """Splits a worker's output into the lines the tee writes to the console, in time linear
    in the bytes and holding at most ``limit`` characters.

    A line ends at ``\n``, ``\r\n`` or ``\r`` (also when the ``\r\n`` is split across reads);
    a line longer than ``limit`` characters is emitted in pieces of ``limit``. Bytes that are
    not UTF-8 become U+FFFD; a character split across reads is decoded whole. Raises
    ``ValueError`` for a ``limit`` below 1.
    """

    def __init__(self, limit: int = TEE_LINE_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._limit = limit
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The unfinished line, as pieces: appending never copies what is already held (joining
        # a growing string per read is what made the old tee quadratic).
        self._held: list[str] = []
        self._held_len = 0
        #: the text so far ended with ``\r``: a ``\n`` next belongs to that line end
        self._after_cr = False

    @property
    def held(self) -> int:
        """How many characters of an unfinished line are held back (never above the limit)."""
        return self._held_len

    def feed(self, data: bytes) -> list[str]:
        """The lines (or pieces of an overlong line) that ``data`` completes, without ends."""
        return self._split(self._decoder.decode(data))

    def finish(self) -> list[str]:
        """At end of output: what is left, as a last line without its end (if any)."""
        lines = self._split(self._decoder.decode(b"", final=True))
        if self._held_len:
            lines.append(self._take())
        return lines

    def _split(self, text: str) -> list[str]:
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
            self._after_cr = False
        if text:
            self._after_cr = text.endswith("\r")
        lines: list[str] = []
        start = 0
        for end in _LINE_END.finditer(text):
            self._hold(text[start : end.start()], lines)
            lines.append(self._take())
            start = end.end()
        self._hold(text[start:], lines)
        return lines

    def _hold(self, text: str, lines: list[str]) -> None:
        while self._held_len + len(text) > self._limit:
            cut = self._limit - self._held_len
            self._held.append(text[:cut])
            self._held_len = self._limit
            lines.append(self._take())
            text = text[cut:]
        if text:
            self._held.append(text)
            self._held_len += len(text)

    def _take(self) -> str:
        line = "".join(self._held)
        self._held.clear()
        self._held_len = 0
        return line


async def tee_stream(
    reader: asyncio.StreamReader,
    log_file: int,
    console: Callable[[], TextIO],
    prefix: str,
) -> None:
    """Copy ``reader`` to the ``log_file`` fd byte for byte, and to the console line by line
    with ``prefix`` in front of each line, until EOF (see :class:`ConsoleLines` for what a
    console line is; each ends with ``\n`` there, but the last if the output did not).

    ``console`` is looked up per write so that a replaced ``sys.stdout`` (pytest's capture, a
    logging redirect) is honoured. The file appends are small page-cache writes; the console
    write is as blocking as any ``print``. Raises ``OSError`` if the log file cannot be written.
    """
    lines = ConsoleLines()
    while chunk := await reader.read(_TEE_CHUNK):
        os.write(log_file, chunk)
        if complete := lines.feed(chunk):
            _write_console(console(), prefix, complete, "\n")
    if rest := lines.finish():
        _write_console(console(), prefix, rest, "")


def _write_console(out: TextIO, prefix: str, lines: list[str], end: str) -> None:
    out.write("\n".join(f"{prefix}{line}" for line in lines) + end)
    out.flush()


def console_for(stream: Std) -> Callable[[], TextIO]:
    """The agent's console stream for worker ``stream`` (``Std.OUT`` or ``Std.ERR``)."""
    if stream == Std.OUT:
        return lambda: sys.stdout
    return lambda: sys.stderr
