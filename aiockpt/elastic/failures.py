"""Error files: how a worker's exception crosses the process boundary to its agent.

A worker cannot raise into its agent, so, as in torchelastic, the entrypoint is wrapped with
:func:`record`: an uncaught exception is written as JSON to the file named by
``TORCHELASTIC_ERROR_FILE`` and then re-raised (the process exits 1). The agent reads that file
into a :class:`ProcessFailure`; with no file it makes up a message from the exit code, as
torchelastic does. The file layout is torchelastic's, so either side can be swapped::

    {"message": {"message": "ValueError: bad value",
                 "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1712345678"}}}

This module has no asyncio import: the worker side runs before any loop exists.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

__all__ = ["ERROR_FILE_ENV", "NOT_AVAILABLE", "ProcessFailure", "format_failures", "record"]

#: the environment variable through which the agent tells a worker where its error file goes
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
#: torchelastic's placeholder for a field that has no value (no error file, no signal)
NOT_AVAILABLE = "<N/A>"
#: torchelastic's message for a non-zero exit that left no error file
NO_ERROR_FILE_MESSAGE = (
    "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def write_error_file(path: str, exc: BaseException) -> None:
    """Write ``exc`` (type, message, the current traceback, timestamp) to ``path``.

    Raises ``OSError`` when the file cannot be written.
    """
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(exc)),
                # torchelastic parses this with int(): keep whole seconds in a string
                "timestamp": str(int(time.time())),
            },
        }
    }
    with open(path, "w") as f:
        json.dump(data, f)


def record(fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
    """Record an exception escaping ``fn`` in ``$TORCHELASTIC_ERROR_FILE``, then re-raise it.

    Use it once per worker, on the top-level function (``main``). It also enables
    :mod:`faulthandler`, so a worker killed by SIGSEGV leaves a Python stack on stderr.
    ``SystemExit(0)`` counts as success and returns ``None``; any other ``SystemExit`` is
    re-raised untouched (its code is the worker's exit code, no error file). Re-raises whatever
    ``fn`` raises; a failure to write the error file is reported on stderr, not raised over it.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        faulthandler.enable(all_threads=True)
        try:
            return fn(*args, **kwargs)
        except SystemExit as exc:
            if exc.code in (0, None):
                return None
            raise
        except Exception as exc:
            path = os.environ.get(ERROR_FILE_ENV)
            if path:
                try:
                    write_error_file(path, exc)
                except OSError as write_error:
                    # The worker's own exception is the one that matters; do not mask it.
                    print(f"record: cannot write error file {path}: {write_error}", file=sys.stderr)
            raise

    return wrapper


@dataclass
class ProcessFailure:
    """One worker that exited non-zero (torchelastic's ``ProcessFailure``).

    Built by the agent from the exit code and, if the worker wrote one, its error file:
    ``message`` is the recorded ``"Type: text"`` or a message derived from the exit code,
    ``timestamp`` the recorded time or the time the agent saw the exit, ``error_file`` the
    path or ``"<N/A>"`` when there was none, ``traceback`` the worker's stack if recorded.
    Reading a malformed error file raises ``ValueError`` (``json.JSONDecodeError``).
    """

    local_rank: int
    pid: int
    exitcode: int
    error_file: str
    error_file_data: dict[str, Any] = field(init=False)
    message: str = field(init=False)
    timestamp: int = field(init=False)
    traceback: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.error_file_data = {"message": "<NONE>"}
        self.timestamp = int(time.time())
        self.message = ""
        if self.error_file and os.path.isfile(self.error_file):
            with open(self.error_file) as f:
                self.error_file_data = json.load(f)
            recorded = self.error_file_data["message"]
            if isinstance(recorded, str):
                self.message = recorded
                self.timestamp = int(self.error_file_data.get("timestamp", self.timestamp))
            else:
                self.message = recorded.get("message", "")
                extra = recorded.get("extraInfo", {})
                self.traceback = extra.get("py_callstack")
                self.timestamp = int(extra.get("timestamp", self.timestamp))
        else:
            self.error_file = NOT_AVAILABLE
        if not self.message:
            if self.exitcode < 0:
                self.message = (
                    f"Signal {-self.exitcode} ({self.signal_name()}) received by PID {self.pid}"
                )
            else:
                self.message = NO_ERROR_FILE_MESSAGE

    def signal_name(self) -> str:
        """The name of the signal that killed the worker (``"SIGTERM"``), else ``"<N/A>"``."""
        if self.exitcode < 0:
            try:
                return signal.Signals(-self.exitcode).name
            except ValueError:
                return NOT_AVAILABLE
        return NOT_AVAILABLE

    def timestamp_isoformat(self) -> str:
        """The failure time as ``YYYY-MM-DD_HH:MM:SS`` (local time), as torchelastic shows it."""
        return datetime.fromtimestamp(self.timestamp).isoformat(sep="_")


def format_failures(name: str, failures: dict[int, ProcessFailure]) -> str:
    """torchelastic's ``ChildFailedError`` report: every failure, root cause (first) last.

    ``failures`` maps global rank to failure in the order the agent observed them, so the
    earliest timestamp wins and ties go to the first observed. Raises ``ValueError`` if empty.
    """
    if not failures:
        raise ValueError("no failures to format")
    root_rank = min(failures, key=lambda rank: failures[rank].timestamp)
    host = socket.getfqdn()

    def describe(idx: int, rank: int, failure: ProcessFailure) -> str:
        signal_name = failure.signal_name()
        signal_text = f" ({signal_name})" if signal_name != NOT_AVAILABLE else ""
        detail = (failure.traceback or failure.message).rstrip().replace("\n", "\n  ")
        return (
            f"[{idx}]:\n"
            f"  time      : {failure.timestamp_isoformat()}\n"
            f"  host      : {host}\n"
            f"  rank      : {rank} (local_rank: {failure.local_rank})\n"
            f"  exitcode  : {failure.exitcode} (pid: {failure.pid}){signal_text}\n"
            f"  error_file: {failure.error_file}\n"
            f"  traceback : {detail}"
        )

    described = {rank: describe(i, rank, f) for i, (rank, f) in enumerate(failures.items())}
    others = [text for rank, text in described.items() if rank != root_rank]
    title = f"{name} FAILED"
    width = min(60, max(len(line) for text in described.values() for line in text.split("\n")))
    width = max(width, len(title))
    return "\n".join(
        [
            "",
            "=" * width,
            title,
            "-" * width,
            "Failures:",
            "\n".join(others) or "  <NO_OTHER_FAILURES>",
            "-" * width,
            "Root Cause (first observed failure):",
            described[root_rank],
            "=" * width,
        ]
    )
