"""A worker *binary* that reports how it was started: ``python probe_worker.py DIR MODE``.

Writes ``DIR/report-<restart count>-<rank>.json``: its pid, whole environment (and ``RANK``
as the C library sees it), ``sys.argv``, ``sys.path[0]``, ``__name__``, and whether
``torch`` was imported before its first line ran (by a spare). Prints one line to stdout and
one to stderr. MODE ``fail-first``: on restart count 0 it then waits for ``DIR/gate`` and
exits 3; otherwise it exits 0.
"""

from __future__ import annotations

import sys

TORCH_PRELOADED = "torch" in sys.modules  # first: before this script imports anything

import ctypes  # noqa: E402 - after the check above
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402


def main(directory: str, mode: str) -> None:
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    rank = os.environ["RANK"]
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    getenv.argtypes = [ctypes.c_char_p]
    report = {
        "pid": os.getpid(),
        "env": dict(os.environ),
        "c_rank": (getenv(b"RANK") or b"").decode(),
        "argv": sys.argv,
        "path0": sys.path[0],
        "name": __name__,
        "torch_preloaded": TORCH_PRELOADED,
    }
    print(f"probe out {restart} {rank}")
    print(f"probe err {restart} {rank}", file=sys.stderr)
    path = os.path.join(directory, f"report-{restart}-{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.rename(path + ".tmp", path)
    if mode == "fail-first" and restart == "0":
        gate = os.path.join(directory, "gate")
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        sys.exit(3)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
